"""Drafters propose the next tokens of a request for speculative decoding; the target model verifies them
all in one forward pass (engine/spec/verify.py). A drafter never changes what is generated, only how many
tokens a step yields.

`NgramDrafter` is prompt lookup: the longest recent n-gram (ngram_max down to ngram_min tokens) that ends
the request's text is searched for earlier in its prompt and output; the tokens that followed that earlier
occurrence are the proposal. It costs no model and shines on inputs the output copies from (RAG, code
edits, summaries)."""

from abc import ABC, abstractmethod

import numpy as np

from engine.request import Request


class Drafter(ABC):
    name: str

    @abstractmethod
    def propose(self, request: Request, num_tokens: int) -> list[int]:
        """Up to `num_tokens` guesses of the request's next tokens (possibly none)."""

    def propose_batch(self, requests: list[Request], num_tokens: list[int]) -> list[list[int]]:
        """Drafts for a step's decoding requests (a remote drafter batches them); must not block for long."""
        return [self.propose(r, k) if k > 0 else [] for r, k in zip(requests, num_tokens, strict=True)]

    def draft_for_step(
        self, running: list[Request], k_max: int, max_batch_tokens: int, max_model_len: int
    ) -> None:
        """Drafts for the next step of every running request that is decoding (one token behind), each as
        many as its adaptive length allows, unless the batch is past the point (`max_batch_tokens` of
        verification) where verifying drafts costs as much as the tokens it saves."""
        decoding = [r for r in running if r.num_tokens - r.num_computed_tokens == 1]
        if len(decoding) * (k_max + 1) > max_batch_tokens:
            for req in decoding:
                req.spec_token_ids = []
            return
        wanted = []
        for req in decoding:
            if req.spec_len == 0:
                req.spec_len = k_max
            room = min(req.spec_len, max_model_len - req.num_tokens - 1)
            if req.params.max_tokens is not None:  # the step emits the accepted drafts and one more
                room = min(room, req.params.max_tokens - req.num_output_tokens - 1)
            wanted.append(max(room, 0))
        for req, drafts in zip(decoding, self.propose_batch(decoding, wanted), strict=True):
            req.spec_token_ids = drafts

    def close(self) -> None:  # noqa: B027 - optional
        pass


class NullDrafter(Drafter):
    """No speculative decoding: nothing is drafted, and no step pays for drafting."""

    name = "none"

    def propose(self, request: Request, num_tokens: int) -> list[int]:
        return []

    def draft_for_step(
        self, running: list[Request], k_max: int, max_batch_tokens: int, max_model_len: int
    ) -> None:
        return None


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, ngram_min: int = 1, ngram_max: int = 4, window: int = 4096):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"ngram_min, ngram_max: got {ngram_min}, {ngram_max}; allowed 1 <= min <= max")
        self.ngram_min, self.ngram_max, self.window = ngram_min, ngram_max, window

    def propose(self, request: Request, num_tokens: int) -> list[int]:
        if num_tokens <= 0:
            return []
        n_total = request.num_tokens
        start = max(0, n_total - self.window)
        tokens = np.asarray(request.token_ids(start, n_total), dtype=np.int64)
        for n in range(min(self.ngram_max, len(tokens) - 1), self.ngram_min - 1, -1):
            tail = tokens[-n:]
            # windows of n tokens that end before the tail itself; the latest match wins
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tail).all(axis=1))
            if hits.size:
                follow = int(hits[-1]) + n
                return tokens[follow : follow + num_tokens].tolist()
        return []


def make_drafter(method: str, **options) -> Drafter:
    if method == "ngram":
        return NgramDrafter(**options)
    raise ValueError(
        f"speculative_method: got {method!r}, allowed ngram or draft_model (with speculative_model)"
    )
