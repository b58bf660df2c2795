"""The engine's counters, and each step's time charged to the requests it computed tokens for."""

from dataclasses import dataclass, field

from engine.request import Request


@dataclass
class EngineStats:
    steps: int = 0
    scheduled_tokens: int = 0  # tokens whose KV was computed, over all steps
    prompt_tokens_computed: int = 0
    generated_tokens: int = 0
    busy_seconds: float = 0.0  # wall time of the steps that computed tokens (split over their requests)
    spec_verifications: int = 0  # (request, step) pairs that verified drafts
    spec_draft_tokens: int = 0  # drafted tokens verified
    spec_accepted_tokens: int = 0  # ... and accepted
    kv_blocks_aged: int = 0  # blocks a KV age policy moved to the low-bit pool
    # documents (engine/document_assembly.py): prompts' documents found in the document cache, or computed
    # into it; their tokens reused as cached, or recomputed in place; prompts that found no room for theirs
    document_hits: int = 0
    document_misses: int = 0
    document_tier_hits: int = 0  # of the misses in HBM, documents loaded from the KV tiers (not computed)
    document_tokens_reused: int = 0
    document_tokens_recomputed: int = 0
    document_fallbacks: int = 0
    sample_events: int = 0  # (request, step) pairs that produced tokens: generated = events + accepted drafts
    requests_by_priority: dict[int, int] = field(default_factory=dict)  # priority -> requests added

    def charge(self, split: list[tuple[Request, int, int]], seconds: float) -> None:
        """A step's wall time (schedule to last token appended) split evenly over its tokens; split holds
        (request, prompt tokens, decode tokens) computed."""
        per_token = seconds / sum(p + d for _, p, d in split)
        self.busy_seconds += seconds
        for req, prompt, decode in split:
            c = req.compute
            c.prefill_seconds += prompt * per_token
            c.decode_seconds += decode * per_token
            c.prefill_tokens += prompt
            c.decode_tokens += decode
