"""A draft model for speculative decoding: a small checkpoint with the target's tokenizer, run by its own
engine (paged KV, prefix cache), proposing each request's next k tokens greedily.

In the target's process (`LLM(target, speculative_model=draft)`) it runs on the target's device before each
verify step; on CPU draft workers (services/draft.py) it answers the decode pools' batches. The prefix
cache keeps each request's context, so a proposal computes only the tokens that arrived since the last one
(plus the last partial block) and then k draft decode steps."""

import itertools
import math

from engine.outputs import ComputeUsage
from engine.request import EngineRequest, Request
from engine.sampling_params import SamplingParams
from engine.spec.drafter import Drafter


class DraftModelDrafter(Drafter):
    name = "draft_model"

    def __init__(self, engine, vocab_size: int | None = None):
        """engine: the draft checkpoint's LLMEngine (prefix caching on), built by the caller (the target's
        engine, or a draft worker). vocab_size: the target's, which the draft's must equal."""
        if vocab_size is not None and engine.model_config.vocab_size != vocab_size:
            raise ValueError(
                f"speculative_model: {engine.config.model} has vocab_size {engine.model_config.vocab_size}, "
                f"the target {vocab_size}; allowed: a draft with the target's tokenizer"
            )
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self._ids = itertools.count()

    @staticmethod
    def blocks_for(max_model_len: int, max_num_seqs: int, block_size: int) -> int:
        """KV blocks that hold a full context for every sequence of a batch."""
        return math.ceil(max_model_len / block_size) * max_num_seqs

    def propose(self, request: Request, num_tokens: int) -> list[int]:
        return self.propose_batch([request], [num_tokens])[0]

    def propose_batch(self, requests: list[Request], num_tokens: list[int]) -> list[list[int]]:
        jobs = [(r.token_ids(0, r.num_tokens), k) for r, k in zip(requests, num_tokens, strict=True)]
        return self.propose_with_usage(jobs)[0]

    def propose_with_usage(
        self, jobs: list[tuple[list[int], int]]
    ) -> tuple[list[list[int]], list[ComputeUsage]]:
        """jobs: (token ids so far, how many to draft) -> greedy continuations (none past the draft's length)
        and the draft engine's time spent on each (its steps split over their tokens)."""
        live = [i for i, (tokens, n) in enumerate(jobs) if n > 0 and len(tokens) + n < self.max_model_len]
        out: list[list[int]] = [[] for _ in jobs]
        usage = [ComputeUsage() for _ in jobs]
        if not live:
            return out, usage
        k = max(jobs[i][1] for i in live)
        params = SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True)
        results = self.engine.run(
            [EngineRequest(f"draft-{next(self._ids)}", jobs[i][0], params, stream=False) for i in live]
        )
        for i, result in zip(live, results, strict=True):
            out[i], usage[i] = result.outputs[0].token_ids[: jobs[i][1]], result.compute
        return out, usage
