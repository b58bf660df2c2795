"""KV handed between workers: blocks reserved for KV another worker writes (the decode side of
disaggregated serving), and blocks a finished request holds until a puller has them (the prefill side)."""

from dataclasses import dataclass

from engine.documents import DocumentRecompute, DocumentSpan
from engine.errors import ParameterError
from engine.kv.block_hash import update_block_hashes
from engine.kv.block_manager import BlockManager
from engine.request import Request
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class KVReservation:
    block_ids: list[int]  # the request's block table for the arriving KV
    num_cached_blocks: int  # leading blocks already holding it (local prefix-cache hits)


class KVHandoff:
    """`in_use(request_id)` says whether a live request owns the id (its blocks are then its own);
    `fence()` returns once no step in flight writes blocks any more (a reserved block may have been freed
    under a step that async scheduling launched; the transfer writing it is not in the device's order)."""

    def __init__(self, block_manager: BlockManager, hash_extra, in_use, fence=lambda: None):
        self.block_manager = block_manager
        self.hash_extra = hash_extra  # cache_salt -> the block-hash extra of this engine's KV
        self.in_use = in_use
        self.fence = fence

    def reserve(
        self,
        request_id: str,
        num_tokens: int,
        token_ids: list[int] | None = None,
        cache_salt: str | None = None,
        coded: list[int] | None = None,
        documents: tuple[DocumentSpan, ...] = (),
        recompute: DocumentRecompute | None = None,
    ) -> KVReservation | None:
        """Blocks for `num_tokens` tokens of KV that another worker will write; None when memory is short.

        Given the tokens, full blocks already in this engine's prefix cache are reused: only the blocks
        after `num_cached_blocks` need to be filled. `coded`: per block, the coded pool (of a KV age policy)
        its KV arrives in, or -1 for the 16-bit pool (a block taken from the prefix cache is 16-bit anyway).
        `documents`, `recompute`: the prompt's document segments as the sender assembled them (its blocks from
        the first document on hash with the assembly, so only such blocks count as cached).
        """
        if num_tokens < 1:
            raise ParameterError("num_tokens", f"got {num_tokens}, allowed >= 1")
        if self.in_use(request_id):
            raise ParameterError("request_id", f"{request_id!r} is already in use")
        hits = []
        if token_ids is not None:
            probe = Request(
                request_id, token_ids[:num_tokens], SamplingParams(), hash_extra=self.hash_extra(cache_salt)
            )
            probe.set_documents(documents, recompute or DocumentRecompute())
            update_block_hashes(probe, self.block_manager.block_size)
            hits = self.block_manager.cached_prefix(probe.block_hashes)
        num_blocks = -(-num_tokens // self.block_manager.block_size)
        if coded is not None and len(coded) != num_blocks:
            raise ParameterError("coded", f"got {len(coded)} entries, allowed one per block ({num_blocks})")
        block_ids = self.block_manager.allocate_blocks(request_id, num_blocks, hits, coded or ())
        if block_ids is None:
            return None
        self.fence()
        return KVReservation(block_ids, len(hits))

    def check_reserved(self, request_id: str, kv_tokens: int, num_tokens: int) -> None:
        """ValueError unless `kv_tokens` of a `num_tokens` request fit the blocks reserved under its id."""
        if not kv_tokens:
            return
        if not 0 < kv_tokens < num_tokens:
            raise ParameterError("kv_computed_tokens", f"got {kv_tokens}, allowed 1..{num_tokens - 1}")
        have = len(self.block_manager.block_ids(request_id)) * self.block_manager.block_size
        if kv_tokens > have:
            raise ParameterError(
                "kv_computed_tokens",
                f"{kv_tokens} tokens but only {have} slots reserved for {request_id!r} (reserve_kv first)",
            )

    def free_reserved(self, request_id: str) -> None:
        """Give back blocks from `reserve` that no request adopted (the transfer failed)."""
        if not self.in_use(request_id):
            self.block_manager.free_blocks(request_id)

    def held(self, request_id: str) -> list[int]:
        """The block table of a finished `hold_kv` request (its KV stays until `release`)."""
        return list(self.block_manager.block_ids(request_id))

    def release(self, request_id: str) -> None:
        if not self.in_use(request_id):  # still running: its own finish will free the blocks
            self.block_manager.free_blocks(request_id)
