"""What the frontend and the engine workers say to each other across Ray.

Workers stream compact per-sequence deltas (new token ids and logprobs, and the text from an offset), never
the cumulative output, so a long generation costs O(tokens) on the wire. The frontend rebuilds the
cumulative output with SequenceState; a migrated or handed-off request resumes where the last worker
stopped because both sides count the same tokens.
"""

from dataclasses import dataclass, field

from engine.documents import DocumentSpan
from engine.outputs import CompletionOutput, ComputeUsage, RequestOutput
from engine.sampling_params import SamplingParams
from services.transport import KVHandle


class WorkerLostError(RuntimeError):
    """Every attempt to continue a sequence met a dead worker."""


@dataclass
class WorkerRequest:
    """One sequence (n == 1). `output_token_ids` are outputs already produced elsewhere (a prefill
    worker's first token, or the tokens a dead decode worker had streamed) with their `output_logprobs`
    when the request asks for logprobs; `kv_handle` points at KV
    for the prompt held by a prefill worker."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] | None = None  # theirs, when params.logprobs asks for them
    cache_salt: str | None = None
    priority: int = 0
    preemptible: bool = True
    slo_class: str = "standard"  # the class's name (metrics and traces)
    trace_context: dict = field(default_factory=dict)  # W3C trace context carrier (observability/tracing.py)
    kv_handle: KVHandle | None = None
    # RAG: the prompt's document segments and their recompute fields (engine/documents.py); the worker that
    # computes the prompt assembles them
    documents: tuple[DocumentSpan, ...] = ()
    document_recompute: dict | None = None

    def document_options(self) -> dict:
        """EngineRequest's document fields, for the worker that computes the prompt."""
        return {"documents": self.documents, "document_recompute": self.document_recompute}


@dataclass
class Delta:
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    text_start: int  # the text replaces the sequence's text from this offset on
    text: str
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    worker: str = ""  # the replica that produced it
    pool: str = ""  # ... and its pool
    compute: ComputeUsage = field(default_factory=ComputeUsage)  # engine time spent since the last delta
    draft_pool: str = ""  # the draft pool that proposed its drafts, if any
    draft_compute: ComputeUsage = field(default_factory=ComputeUsage)  # ... and its time since the last delta


@dataclass
class PrefillResult:
    """The first token, and a handle to the prompt's KV unless the request already finished."""

    delta: Delta
    kv_handle: KVHandle | None
    # the request's document recompute as this pool resolved it (its fields over the pool's): the decode side
    # hashes the handed-over KV with it
    document_recompute: dict | None = None


class DeltaTracker:
    """Worker side: turns the engine's cumulative outputs for one sequence into deltas."""

    def __init__(self, num_resumed_tokens: int, worker: str, pool: str = "", draft_pool: str = ""):
        self.sent_tokens = num_resumed_tokens
        self.text: str | None = None  # None: the first delta sends the whole text
        self.worker, self.pool, self.draft_pool = worker, pool, draft_pool
        self.sent_compute = self.sent_draft = ComputeUsage()

    def delta(self, out: RequestOutput) -> Delta:
        c = out.outputs[0]
        start = len(self.text) if self.text is not None and c.text.startswith(self.text) else 0
        new = slice(self.sent_tokens, None)
        delta = Delta(
            c.token_ids[new],
            c.logprobs[new] if c.logprobs is not None else None,
            start,
            c.text[start:],
            c.finish_reason,
            c.stop_reason,
            out.num_cached_tokens,
            self.worker,
            self.pool,
            out.compute - self.sent_compute,
            self.draft_pool,
            out.draft_compute - self.sent_draft,
        )
        self.sent_tokens, self.text, self.sent_compute = len(c.token_ids), c.text, out.compute
        self.sent_draft = out.draft_compute
        return delta


class SequenceState:
    """Frontend side: one sequence rebuilt from deltas, whichever workers sent them."""

    def __init__(self, index: int, want_logprobs: bool):
        self.index = index
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = [] if want_logprobs else None
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_cached_tokens = 0
        self.compute_by_pool: dict[str, ComputeUsage] = {}

    def apply(self, delta: Delta) -> None:
        self.compute_by_pool[delta.pool] = (
            self.compute_by_pool.get(delta.pool, ComputeUsage()) + delta.compute
        )
        if delta.draft_pool:
            self.compute_by_pool[delta.draft_pool] = (
                self.compute_by_pool.get(delta.draft_pool, ComputeUsage()) + delta.draft_compute
            )
        self.token_ids += delta.token_ids
        if self.logprobs is not None and delta.logprobs is not None:
            self.logprobs += delta.logprobs
        self.text = self.text[: delta.text_start] + delta.text
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def output(self) -> CompletionOutput:
        cumulative = (
            sum(lp[t] for t, lp in zip(self.token_ids, self.logprobs, strict=False))
            if self.logprobs is not None
            else None
        )
        return CompletionOutput(
            self.index,
            self.text,
            list(self.token_ids),
            cumulative,
            list(self.logprobs) if self.logprobs is not None else None,
            self.finish_reason,
            self.stop_reason,
        )
