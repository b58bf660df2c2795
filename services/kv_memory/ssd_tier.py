"""SSD tier: KV blocks in one preallocated slab file, found through an append-only index log.

Crash safety is by ordering: a block's bytes are written and synced before the index record naming them
is appended and synced, and a slot's old entry is deleted (synced) before the slot is overwritten. Every
index record carries its own CRC32 and the block's checksum, so after a crash a torn record ends the replay
and a torn or damaged block is found on read, dropped, and never served.

Content is bound to its key: the block checksum covers the block hash and the bytes, and each slot starts
with a header naming the hash it holds. An index that points a hash at another block's slot (damaged,
stale or rewritten with valid CRCs) fails the check on read, and the block is dropped and recomputed. The
directory is created 0700 and locked by the tier that opens it: one process per directory.
"""

import fcntl
import json
import os
import struct
import threading
import zlib
from collections import OrderedDict
from pathlib import Path

_RECORD = struct.Struct("<4sB16sII")  # magic, op, block hash, slot, block checksum; then the record's crc32
_MAGIC, _PUT, _DELETE = b"RLKV", 1, 2
_RECORD_BYTES = _RECORD.size + 4
_SLOT_HEADER = struct.Struct("<4s16sI8x")  # magic, the block hash the slot holds, its checksum
_SLOT_MAGIC = b"RLKB"
_FORMAT = 2  # 1: unbound CRC32 of the bytes, no slot headers


class DirectoryInUse(ValueError):
    """Another SsdTier (this process or another) holds the directory."""


def block_checksum(block_hash: bytes, data) -> int:
    """CRC32 of the block hash followed by the bytes: a block read under another key does not verify."""
    return zlib.crc32(data, zlib.crc32(block_hash))


def open_claimed(
    root: str | os.PathLike,
    prefix: str,
    capacity_blocks: int,
    block_bytes: int,
    sync: bool = True,
    max_slots: int = 4096,
) -> "SsdTier":
    """The tier in the first of root/prefix-0, root/prefix-1, ... that no live tier holds: a replica that
    restarts (the old process is gone, so is its lock) finds its own blocks again, and replicas of one pool
    never share a directory."""
    for rank in range(max_slots):
        try:
            return SsdTier(Path(root) / f"{prefix}-{rank}", capacity_blocks, block_bytes, sync)
        except DirectoryInUse:
            continue
    raise ValueError(f"ssd directory: all {max_slots} slots {prefix}-N under {root} are in use")


class SsdTier:
    """Up to `capacity_blocks` blocks of `block_bytes` bytes under `directory`, keyed by 16-byte hashes.

    Contract: `get` returns exactly the bytes `put` stored or None (missing or damaged); an entry survives
    a restart once `put` returned. Thread-safe; LRU eviction within the tier.
    """

    def __init__(
        self, directory: str | os.PathLike, capacity_blocks: int, block_bytes: int, sync: bool = True
    ):
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks: got {capacity_blocks}, allowed >= 1")
        if block_bytes < 1:
            raise ValueError(f"block_bytes: got {block_bytes}, allowed >= 1")
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise ValueError(f"ssd directory: {self.dir} is not writable ({e.strerror})") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise DirectoryInUse(f"ssd directory: {self.dir} is held by another tier") from None
        self.capacity_blocks, self.block_bytes, self.sync = capacity_blocks, block_bytes, sync
        self.slot_bytes = _SLOT_HEADER.size + block_bytes
        self._check_meta()
        self.corrupt_blocks = 0  # damaged blocks found on read (dropped, never served)
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, tuple[int, int]] = OrderedDict()  # hash -> (slot, crc), LRU first
        self._slab = os.open(self.dir / "slab.bin", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self._slab, capacity_blocks * self.slot_bytes)
        self._replay()
        self._log = open(self.dir / "index.log", "ab")  # noqa: SIM115 - held open for appends
        used = {slot for slot, _ in self._entries.values()}
        self._free = [s for s in range(capacity_blocks - 1, -1, -1) if s not in used]

    def _check_meta(self) -> None:
        meta_path = self.dir / "meta.json"
        meta = {"capacity_blocks": self.capacity_blocks, "block_bytes": self.block_bytes, "format": _FORMAT}
        if meta_path.exists():
            found = json.loads(meta_path.read_text())
            if found != meta:
                raise ValueError(
                    f"ssd directory: {self.dir} holds a tier with {found}, not {meta}; "
                    f"use another directory or remove it"
                )
        else:
            meta_path.write_text(json.dumps(meta))

    def _replay(self) -> None:
        path = self.dir / "index.log"
        data = path.read_bytes() if path.exists() else b""
        good = 0
        self._records = 0
        by_slot: dict[int, bytes] = {}
        for start in range(0, len(data) - _RECORD_BYTES + 1, _RECORD_BYTES):
            body = data[start : start + _RECORD.size]
            (crc,) = struct.unpack_from("<I", data, start + _RECORD.size)
            magic, op, block_hash, slot, block_crc = _RECORD.unpack(body)
            if magic != _MAGIC or zlib.crc32(body) != crc or slot >= self.capacity_blocks:
                break  # a torn or foreign record: nothing after it is trusted
            good = start + _RECORD_BYTES
            self._records += 1
            if op == _PUT:
                if (previous := by_slot.get(slot)) is not None:
                    self._entries.pop(previous, None)  # the slot now holds this block
                by_slot[slot] = block_hash
                self._entries[block_hash] = (slot, block_crc)
            elif (entry := self._entries.pop(block_hash, None)) is not None:
                by_slot.pop(entry[0], None)
        if good != len(data):
            with open(path, "r+b") as f:  # cut the torn tail so new records follow good ones
                f.truncate(good)

    def __len__(self) -> int:
        return len(self._entries)

    def hashes(self) -> list[bytes]:
        """The blocks held now (a snapshot, least recently used first)."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._entries

    def _append(self, op: int, block_hash: bytes, slot: int, block_crc: int) -> None:
        body = _RECORD.pack(_MAGIC, op, block_hash, slot, block_crc)
        self._log.write(body + struct.pack("<I", zlib.crc32(body)))
        self._log.flush()
        if self.sync:
            os.fsync(self._log.fileno())
        self._records += 1

    def _compact(self) -> None:
        """Rewrite the log as one PUT per live entry (LRU order kept), atomically by rename."""
        tmp = self.dir / "index.log.tmp"
        with open(tmp, "wb") as f:
            for block_hash, (slot, crc) in self._entries.items():
                body = _RECORD.pack(_MAGIC, _PUT, block_hash, slot, crc)
                f.write(body + struct.pack("<I", zlib.crc32(body)))
            f.flush()
            os.fsync(f.fileno())
        self._log.close()
        os.replace(tmp, self.dir / "index.log")
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself is durable
        finally:
            os.close(dir_fd)
        self._log = open(self.dir / "index.log", "ab")  # noqa: SIM115
        self._records = len(self._entries)

    def put(self, block_hash: bytes, data: bytes | memoryview) -> bytes | None:
        """Store a block; returns the hash it evicted to make room, if any."""
        if len(block_hash) != 16:
            raise ValueError(f"block_hash: need 16 bytes, got {len(block_hash)}")
        if len(data) != self.block_bytes:
            raise ValueError(f"data: need {self.block_bytes} bytes, got {len(data)}")
        with self._lock:
            if block_hash in self._entries:
                self._entries.move_to_end(block_hash)
                return None
            evicted = None
            if not self._free:
                evicted, (slot, _) = self._entries.popitem(last=False)
                self._append(_DELETE, evicted, slot, 0)  # durable before the slot is overwritten
                self._free.append(slot)
            slot = self._free.pop()
            crc = block_checksum(block_hash, data)
            header = _SLOT_HEADER.pack(_SLOT_MAGIC, block_hash, crc)
            os.pwritev(self._slab, [header, data], slot * self.slot_bytes)
            if self.sync:
                os.fdatasync(self._slab)  # the bytes are on disk before the index names them
            self._append(_PUT, block_hash, slot, crc)
            self._entries[block_hash] = (slot, crc)
            if self._records > 4 * self.capacity_blocks + 64:
                self._compact()
            return evicted

    def get(self, block_hash: bytes) -> bytes | None:
        with self._lock:
            entry = self._entries.get(block_hash)
            if entry is None:
                return None
            slot, crc = entry
            header, data = bytearray(_SLOT_HEADER.size), bytearray(self.block_bytes)
            got = os.preadv(self._slab, [header, data], slot * self.slot_bytes)
            if not self._verified(got, header, block_hash, data, crc):
                self.corrupt_blocks += 1
                self._drop(block_hash, slot)
                return None
            self._entries.move_to_end(block_hash)
            return bytes(data)

    def _verified(self, got: int, header, block_hash: bytes, data, crc: int) -> bool:
        """The slot was read whole, names this hash, and its bytes match the key's checksum."""
        return (
            got == self.slot_bytes
            and _SLOT_HEADER.unpack(header) == (_SLOT_MAGIC, block_hash, crc)
            and block_checksum(block_hash, data) == crc
        )

    def read_into(self, block_hash: bytes, out) -> bool:
        """Read a block straight into `out` (a writable buffer of block_bytes, e.g. a pinned DRAM slot)
        and verify it; False if missing or damaged (then dropped). Reads run in parallel: the lock is held
        only to look the block up and, after the read, to confirm the slot still holds it."""
        with self._lock:
            entry = self._entries.get(block_hash)
        if entry is None:
            return False
        slot, crc = entry
        view = memoryview(out).cast("B")
        if len(view) != self.block_bytes:
            raise ValueError(f"out: need {self.block_bytes} bytes, got {len(view)}")
        header = bytearray(_SLOT_HEADER.size)
        got = os.preadv(self._slab, [header, view], slot * self.slot_bytes)
        good = self._verified(got, header, block_hash, view, crc)
        with self._lock:
            if self._entries.get(block_hash) != entry:
                return False  # evicted and its slot reused while we read: a miss, not damage
            if not good:
                self.corrupt_blocks += 1
                self._drop(block_hash, slot)
                return False
            self._entries.move_to_end(block_hash)
            return True

    def discard(self, block_hash: bytes) -> bool:
        with self._lock:
            entry = self._entries.get(block_hash)
            if entry is not None:
                self._drop(block_hash, entry[0])
            return entry is not None

    def _drop(self, block_hash: bytes, slot: int) -> None:
        self._append(_DELETE, block_hash, slot, 0)
        del self._entries[block_hash]
        self._free.append(slot)

    def close(self) -> None:
        with self._lock:
            self._log.close()
            os.close(self._slab)
            os.close(self._lock_fd)  # releases the directory
