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

    def close(self) -> None:  # noqa: B027 - optional
        pass


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
