"""Assembles a prompt's documents from the document cache (RAG): their KV, computed once at canonical
positions, is copied into the request's blocks at its offset with the keys re-rotated
(kernels/kv_rerotate.py), and one forward pass computes the rest of the range: the tokens between
documents and each document's recompute selection (engine/documents.py).

Causality makes one pass enough: a token computed at position q attends to positions <= q only, whose KV is
either reused (fixed before the pass) or computed in the same pass, layer by layer. The computed tokens go
into the pass as one sequence over the request's block table whose queries sit at their own positions
(`AttentionMetadata.query_positions`: the varlen kernel and the torch reference mask keys after each
query), so every key tile is read once per query tile however scattered the selection is. A document the
cache lacks is prefilled first, alone at positions 0.., in the same call.

With KV tiers below HBM (a `KVStore`), a document goes down as soon as it is computed, each block under a
key of its own (the document's key and the block's index), and a document the HBM cache lacks is loaded
from the store before it is computed: evicted from HBM, or computed by another worker of the node.

Re-rotating keys at assembly (not storing them before RoPE and rotating in the attention kernel, as MEPIC
does) leaves the attention kernels and every decode step untouched; it costs one pass over the reused keys
per prompt, measured in benchmarks/results/document_kv.json.
"""

import math
from typing import cast

import torch

from engine.attention import AttentionBackend, AttentionMetadata, ForwardContext
from engine.documents import DocumentSpan, document_key, tier_keys
from engine.kv.block_manager import BlockManager
from engine.kv.document_cache import DocumentCache, DocumentEntry
from engine.kv.offload import KVStore
from engine.kv.pool import layer_views
from engine.models.decoder import DecoderForCausalLM, DecoderLayer
from engine.request import Request
from engine.stats import EngineStats
from kernels.kv_rerotate import rerotate_copy, rerotate_copy_ref

Run = tuple[list[int], int, int]  # (block table, first position, end): one sequence of the pass


class DocumentAssembler:
    def __init__(
        self,
        model: DecoderForCausalLM,
        kv_pool: torch.Tensor,
        backend: AttentionBackend,
        block_manager: BlockManager,
        cache: DocumentCache,
        stats: EngineStats,
        kv_scales: torch.Tensor | None = None,
        store: KVStore | None = None,
    ):
        """kv_scales [L, 2, kv_heads]: an FP8 pool's scales (keys are re-rotated in their values); store: the
        KV tiers below HBM, where documents go down and come back from."""
        self.model = model
        self.kv_pool = kv_pool
        self.kv_caches = layer_views(kv_pool)
        self.backend = backend
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.cache = cache
        self.stats = stats
        self.kv_scales = kv_scales
        self.store = store
        self.device = kv_pool.device

    @torch.inference_mode()
    def assemble(self, request: Request, start: int) -> int:
        """Fill the request's KV (its blocks allocated for the whole prompt) from position `start` to the end
        of its last document, short of its last prompt token (the step computes that one, to sample).
        -> the position its KV now reaches: `start` when nothing was assembled (no document after it, or
        no room in the cache for a document it lacks; the request then computes its prompt as usual)."""
        end = min(max((s.end for s in request.documents), default=0), request.num_prompt_tokens - 1)
        spans = [s for s in request.documents if s.end > start and s.start < end]
        if end <= start or not spans:
            return start
        rc = request.recompute
        # documents whose every token in range is recomputed (first_tokens covers them) need no cached KV
        reused = [s for s in spans if rc.ratio or s.start + rc.first_tokens < min(s.end, end)]
        entries = self._entries(request, reused) if reused else []
        if entries is None:
            self.stats.document_fallbacks += 1
            return start
        table = self.block_manager.block_ids(request.request_id)
        placed = dict(zip(reused, self._place(reused, entries, table, start, end), strict=True))
        ranges = [(max(s.start, start), min(s.end, end)) for s in spans]
        self._recompute(request, spans, table, start, end, [placed.get(s) for s in spans], ranges)
        return end

    def add(self, token_ids: list[int], extra: bytes, pinned: bool) -> DocumentEntry | None:
        """Compute a document into the cache (or find it there), pinning it when asked; None when the cache
        has no room for it."""
        key = document_key(token_ids, extra)
        entry = self.cache.get(key)
        if entry is None:
            entry = self.cache.reserve(key, len(token_ids))
            if entry is None:
                return None
            loaded = self._load(entry)
            if loaded < len(token_ids):
                with torch.inference_mode():
                    self._prefill([(entry, token_ids, loaded)])
        entry.pinned = entry.pinned or pinned
        return entry

    # -- the parts --------------------------------------------------------------------------------

    def _entries(self, request: Request, spans: list[DocumentSpan]) -> list[DocumentEntry] | None:
        """Each span's cache entry; documents the cache lacks are computed now. None when one cannot fit."""
        keys = [document_key(request.prompt_token_ids[s.start : s.end], request.hash_extra) for s in spans]
        entries: dict[bytes, DocumentEntry] = {}
        missing: list[tuple[DocumentEntry, list[int], int]] = []
        for key, span in zip(keys, spans, strict=True):
            if key in entries:
                continue
            entry = self.cache.get(key)
            if entry is None:
                entry = self.cache.reserve(key, span.length, keep=frozenset(keys))
                if entry is None:
                    for new, _, _ in missing:
                        self.cache.remove(new.key)
                    return None
                loaded = self._load(entry)
                if loaded == span.length:
                    self.stats.document_tier_hits += 1
                else:  # computed (from where the tiers' blocks stop)
                    missing.append((entry, request.prompt_token_ids[span.start : span.end], loaded))
            else:
                self.stats.document_hits += 1
            entries[key] = entry
        if missing:
            self.stats.document_misses += len(missing)
            self._prefill(missing)
        return [entries[key] for key in keys]

    def _prefill(self, documents: list[tuple[DocumentEntry, list[int], int]]) -> None:
        """Documents' KV at positions 0.., each alone (from the first token its loaded blocks lack), in one
        pass; then down to the tiers."""
        runs = [(entry.block_ids, loaded, len(ids)) for entry, ids, loaded in documents]
        ids = [t for _, doc, loaded in documents for t in doc[loaded:]]
        self.stats.prompt_tokens_computed += len(ids)
        self.forward(ids, runs)
        if self.store is not None:
            for entry, _, _ in documents:
                keys = tier_keys(entry.key, len(entry.block_ids))
                self.store.offload(keys, [0] * len(keys), self.kv_pool, entry.block_ids, None)

    def _load(self, entry: DocumentEntry) -> int:
        """A new entry's leading blocks from the tiers, as many as they hold intact. -> the tokens loaded.

        On a GPU the device is synchronized first: the entry's blocks may have been freed under a step in
        flight, or be on their way down to a tier (their next writer waits for that copy on this stream), and
        the store copies on a stream of its own."""
        if self.store is None:
            return 0
        keys = tier_keys(entry.key, len(entry.block_ids))
        held = self.store.lookup(keys)
        if not held:
            return 0
        if self.kv_pool.is_cuda:
            torch.cuda.current_stream(self.device).synchronize()
        loaded = self.store.load(keys[:held], self.kv_pool, entry.block_ids[:held])
        return min(loaded * self.block_size, entry.num_tokens)

    def _place(
        self, spans: list[DocumentSpan], entries: list[DocumentEntry], table: list[int], start: int, end: int
    ) -> list[tuple[int, int]]:
        """Copy the documents' KV to their prompt positions in [start, end), keys turned by each document's
        offset. -> per span, the positions placed [a, b)."""
        bs = self.block_size
        src: list[int] = []
        dst: list[int] = []
        offsets: list[int] = []
        placed = []
        for span, entry in zip(spans, entries, strict=True):
            a, b = max(span.start, start), min(span.end, end)
            src += self.cache.block_slots(entry, range(a - span.start, b - span.start))
            dst += [table[p // bs] * bs + p % bs for p in range(a, b)]
            offsets += [span.start] * (b - a)
            placed.append((a, b))
        cos, sin = self.model.rotary.cos_sin(torch.tensor(offsets, device=self.device))
        as_tensor = lambda slots: torch.tensor(slots, dtype=torch.int64, device=self.device)  # noqa: E731
        copy = rerotate_copy if self.kv_pool.is_cuda else rerotate_copy_ref
        copy(self.kv_pool, as_tensor(src), as_tensor(dst), cos, sin, self.kv_scales)
        return placed

    def _recompute(
        self,
        request: Request,
        spans: list[DocumentSpan],
        table: list[int],
        start: int,
        end: int,
        placed: list[tuple[int, int] | None],
        ranges: list[tuple[int, int]],
    ) -> None:
        """One pass over [start, end): every token outside the documents and each document's selection.
        placed: per span, the positions its cached KV was copied to (None: none, it is recomputed whole);
        ranges: per span, its positions in [start, end)."""
        rc = request.recompute
        keep = torch.ones(end - start, dtype=torch.bool)  # computed from layer 0 on (or the selection layer)
        for span, where in zip(spans, placed, strict=True):
            if where is None:
                continue
            a, b = where
            keep[a - start : b - start] = False
            first = min(span.start + rc.first_tokens, b)
            keep[max(a, span.start) - start : max(first, a) - start] = True  # EPIC: the first tokens
        doc_tokens = sum(b - a for a, b in ranges)
        ids = request.prompt_token_ids[start:end]
        if rc.ratio and int(keep.logical_not().sum()):
            chosen = self._forward_blended(ids, table, start, keep, rc.ratio, rc.select_layer)
        else:
            chosen = keep
            rows = keep.nonzero().flatten().tolist()
            if rows:
                ctx = self._context([(table, [start + i for i in rows])], at_positions=True)
                self._layers([ids[i] for i in rows], ctx)
        recomputed = doc_tokens - int((~chosen).sum())
        request.num_cached_tokens += doc_tokens - recomputed  # usage: prompt tokens not computed
        self.stats.document_tokens_reused += doc_tokens - recomputed
        self.stats.document_tokens_recomputed += recomputed
        self.stats.prompt_tokens_computed += int(chosen.sum())

    @torch.inference_mode()
    def forward(self, ids: list[int], runs: list[Run]) -> torch.Tensor | None:
        """The model over the runs' tokens (ids in run order): their K/V into the pool. -> the final hidden
        states [len(ids), hidden] (logits: model.compute_logits), None without tokens."""
        if not ids:
            return None
        return self._layers(ids, self._context([(table, list(range(a, b))) for table, a, b in runs]))

    def _layers(self, ids: list[int], ctx: ForwardContext) -> torch.Tensor:
        x, residual = self.model.model.embed_tokens(torch.tensor(ids, device=self.device)), None
        for layer in self.model.model.layers:
            x, residual = layer(x, residual, ctx)
        return self.model.model.norm(x, residual)[0]

    def _forward_blended(
        self, ids: list[int], table: list[int], start: int, keep: torch.Tensor, ratio: float, select: int
    ) -> torch.Tensor:
        """CacheBlend: every token of the range runs layers 0..select-1 and writes layer `select`'s K/V; the
        reused tokens whose K/V there deviate most from the cached (the top `ratio` of them) join `keep` for
        the rest of the pass. -> the tokens computed through the last layer."""
        bs, positions = self.block_size, range(start, start + len(ids))
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in positions], device=self.device)
        cached = self.kv_caches[select][slots // bs, :, slots % bs].float()  # [n, 2, H, D] as placed
        x, residual = self.model.model.embed_tokens(torch.tensor(ids, device=self.device)), None
        ctx = self._context([(table, list(positions))])
        layers = cast(list[DecoderLayer], list(self.model.model.layers))
        for layer in layers[:select]:
            x, residual = layer(x, residual, ctx)
        q, residual = layers[select].before_attention(x, residual, ctx)
        fresh = self.kv_caches[select][slots // bs, :, slots % bs].float()
        deviation = (fresh - cached).square().sum(dim=(1, 2, 3)).cpu()
        reused = (~keep).nonzero().flatten()
        top = deviation[reused].topk(math.ceil(ratio * len(reused))).indices
        chosen = keep.clone()
        chosen[reused[top]] = True
        rows = chosen.nonzero().flatten()
        ctx = self._context([(table, [start + i for i in rows.tolist()])], at_positions=True)
        rows = rows.to(self.device)
        q, residual = q[rows], residual[rows]
        x, residual = layers[select].after_attention(layers[select].self_attn.attend(q, ctx), residual)
        for layer in layers[select + 1 :]:
            x, residual = layer(x, residual, ctx)
        return chosen

    def _context(self, seqs: list[tuple[list[int], list[int]]], at_positions: bool = False) -> ForwardContext:
        """The pass's metadata: per sequence, (its block table, its queries' positions, ascending); its context
        ends at its last query. at_positions: the queries sit at those positions (each attends to every
        position up to its own: AttentionMetadata.query_positions); else they are consecutive, the sequence's
        last tokens."""
        bs, dev = self.block_size, self.device
        tables = torch.zeros(len(seqs), max(len(t) for t, _ in seqs), dtype=torch.int32)
        positions: list[int] = []
        slots: list[int] = []
        query_start, seq_lens = [0], []
        for i, (table, pos) in enumerate(seqs):
            tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
            positions += pos
            slots += [table[p // bs] * bs + p % bs for p in pos]
            query_start.append(query_start[-1] + len(pos))
            seq_lens.append(pos[-1] + 1)
        pos_dev = torch.tensor(positions, dtype=torch.int32, device=dev)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=tables.to(dev),
            max_query_len=max(len(p) for _, p in seqs),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=query_start,
            seq_lens_cpu=seq_lens,
            block_size=bs,
            query_positions=pos_dev if at_positions else None,
        )
        self.backend.plan(meta, self.model.config.num_kv_heads)
        cos, sin = self.model.rotary.cos_sin(pos_dev)
        return ForwardContext(meta, self.kv_caches, self.backend, cos, sin)
