"""A request as the engine sees it: tokens so far and how many of them have KV computed."""

import enum
import time
from dataclasses import dataclass, field

import torch

from engine.documents import DocumentRecompute, DocumentSpan, assembly_extra
from engine.errors import ParameterError
from engine.outputs import ComputeUsage
from engine.sampling_params import SamplingParams
from engine.structured_output import GrammarMatcher


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    LOADING_KV = "loading_kv"  # admitted; its prompt's KV is being loaded from a lower tier
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


@dataclass
class EngineRequest:
    """A request as a caller adds it (LLMEngine.add_request); the engine makes it n sequences.

    `stream=False`: outputs only when finished, text decoded once at the end unless stop strings need it
    earlier (LLM.generate). Disaggregated serving: `output_token_ids` resumes a request whose first tokens
    another worker produced (with their `output_logprobs` when the request asks for logprobs);
    `kv_computed_tokens` says the blocks reserved under its id already hold that
    many tokens' KV; `hold_kv` keeps its blocks after it finishes until the KV handoff releases them.
    """

    request_id: str
    prompt: str | list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0
    preemptible: bool = True
    cache_salt: str | None = None
    arrival_time: float | None = None
    stream: bool = True
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] | None = None  # theirs, when params.logprobs asks for them
    kv_computed_tokens: int = 0
    hold_kv: bool = False
    # RAG: prompt token ranges that are documents, their KV reused from the document cache (engine/documents.py),
    # and which of their tokens are recomputed (None: the engine's default)
    documents: tuple[DocumentSpan, ...] = ()
    document_recompute: DocumentRecompute | dict | None = None  # a dict: those fields over the engine's


class Request:
    """One sequence. There is no prefill or decode phase: `num_computed_tokens` catches up to `num_tokens`.

    `block_hashes[i]` is the chained hash of full block i of prompt + output tokens; the scheduler and the
    block manager use it for prefix caching.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        eos_token_ids: frozenset[int] = frozenset(),
        priority: int = 0,
        hash_extra: bytes = b"",
        arrival_time: float | None = None,
        seed_offset: int = 0,
        hold_kv: bool = False,
        preemptible: bool = True,
    ):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.priority = priority
        self.preemptible = preemptible  # a higher class may evict it (its tokens are kept and recomputed)
        # its structured output's state (params.structured_output), set by the engine when it is added
        self.grammar: GrammarMatcher | None = None
        self.hold_kv = hold_kv  # keep the blocks after finishing: another worker pulls them
        self.hash_extra = hash_extra
        # document segments and how they are assembled (set_documents)
        self.documents: tuple[DocumentSpan, ...] = ()
        self.recompute = DocumentRecompute()
        self._assembly_extras: dict[int, bytes] = {}
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.arrival_wall = time.time()  # wall clock (traces, queue-time metrics)
        self.scheduled_wall: float | None = None  # when it was first admitted to the running batch
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        # async scheduling: tokens scheduled in a step not yet updated, and tokens that step samples
        self.num_inflight_tokens = 0
        self.num_output_placeholders = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first scheduling; -1 until scheduled
        self.num_preemptions = 0
        self.compute = ComputeUsage()  # its share of the engine steps it was in
        self.draft_compute = ComputeUsage()  # a remote draft pool's time on its drafts (services/draft.py)
        self.spec_token_ids: list[
            int
        ] = []  # drafted next tokens the next step verifies (speculative decoding)
        self.spec_len = 0  # how many to draft next (adapted to its acceptance; 0: not yet started)
        self.block_hashes: list[bytes] = []
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict[int, float]] = []
        self.cumulative_logprob = 0.0
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed((params.seed + seed_offset) % 2**64)

    def resume(
        self,
        output_token_ids: list[int],
        vocab_size: int,
        logprobs: list[dict[int, float]] | None = None,
    ) -> None:
        """Continue a request whose first outputs another worker produced: seeded draws stay in step, and
        the logprobs it reported stay with their tokens (one per token when the request asks for them)."""
        if self.params.logprobs is not None:
            if logprobs is None or len(logprobs) != len(output_token_ids):
                raise ParameterError(
                    "output_logprobs",
                    f"one per resumed token when logprobs are asked for: {len(output_token_ids)} tokens, "
                    f"{'no' if logprobs is None else len(logprobs)} logprobs",
                )
            self.logprobs = [dict(lp) for lp in logprobs]
            self.cumulative_logprob = sum(lp[t] for t, lp in zip(output_token_ids, logprobs, strict=True))
        if self.grammar is not None and self.grammar.accept_tokens(output_token_ids) != len(output_token_ids):
            raise ParameterError("output_token_ids", "the resumed tokens do not match the structured output")
        self.output_token_ids = list(output_token_ids)
        if self.generator is not None and not self.params.greedy:
            for _ in output_token_ids:  # the sampler draws one exponential vector per sampled token
                torch.empty(vocab_size).exponential_(generator=self.generator)

    def set_documents(self, spans: tuple[DocumentSpan, ...], recompute: DocumentRecompute) -> None:
        """Mark document segments of the prompt (engine/document_assembly.py), before any block is hashed:
        blocks from the first document on hash with the assembly in their extra."""
        assert not self.block_hashes, "set before the blocks are hashed"
        self.documents, self.recompute = spans, recompute
        self._assembly_extras = {}  # documents counted -> extra

    def block_extra(self, index: int, block_size: int) -> bytes:
        """The hash extra of full block `index`: the assembly's once the block reaches a document. Without a
        CacheBlend selection a block's KV depends only on the documents that start before its end, so only
        those go in (a later turn that adds documents after them still hits); a CacheBlend selection is made
        over every document at once, so all of them go in."""
        end = (index + 1) * block_size
        if not self.documents or end <= self.documents[0].start:
            return self.hash_extra
        count = (
            len(self.documents) if self.recompute.ratio else sum(1 for s in self.documents if s.start < end)
        )
        extra = self._assembly_extras.get(count)
        if extra is None:
            extra = self._assembly_extras[count] = assembly_extra(
                self.hash_extra, self.documents[:count], self.recompute
            )
        return extra

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def scheduled_tokens(self) -> int:
        """Tokens whose KV is computed or being computed by a step in flight."""
        return self.num_computed_tokens + self.num_inflight_tokens

    @property
    def total_tokens(self) -> int:
        """Tokens known, and those steps in flight are sampling."""
        return self.num_tokens + self.num_output_placeholders

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_ids_with_spec(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output + the drafted tokens after them."""
        n = self.num_tokens
        real = self.token_ids(start, min(end, n)) if start < n else []
        return real + self.spec_token_ids[max(start - n, 0) : max(end - n, 0)]

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the whole list."""
        p = self.num_prompt_tokens
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, status={self.status.value})"
        )
