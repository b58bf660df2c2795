"""A worker's KV events as numbered batches, so any number of routers can follow them through Ray Serve's
routing stats (every replica reports its latest batches each stats period; each router applies the ones it
has not seen). A router that fell behind the kept batches waits for the next full snapshot, which the feed
includes every `snapshot_every` reports."""

from engine.kv.events import KVEventLog
from services.messages.kv_feed import KVFeedReport


class KVEventFeed:
    def __init__(self, log: KVEventLog, snapshot, keep: int = 64, snapshot_every: int = 20):
        """`snapshot()` -> {tier: [block hashes]}: everything the worker holds now."""
        self.log, self.snapshot, self.keep, self.snapshot_every = log, snapshot, keep, snapshot_every
        self.seq = 0
        self._batches: list[tuple[int, list[tuple]]] = []
        self._reports = 0
        self._force = False

    def force_snapshot(self) -> None:
        """The next report carries a full snapshot (readers rebuild this worker's entries from it)."""
        self._force = True

    def report(self) -> KVFeedReport:
        """The feed's part of one routing-stats report: new events become a batch; the last `keep`
        batches go out, and every `snapshot_every`-th report (and the first) a full snapshot too."""
        events = [(e.kind, e.tier, list(e.block_hashes)) for e in self.log.drain()]
        if events or self.log.dropped:
            self.seq += 1
            self._batches = (self._batches + [(self.seq, events)])[-self.keep :]
        out = KVFeedReport(self.seq, list(self._batches))
        if self._reports % self.snapshot_every == 0 or self.log.dropped or self._force:
            self._force = False
            self.log.dropped = 0  # events were lost: readers must resync from this snapshot
            out.snapshot = (self.seq, {tier: list(hashes) for tier, hashes in self.snapshot().items()})
        self._reports += 1
        return out
