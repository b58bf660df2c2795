"""Per-request sampling parameters, validated at construction (OpenAI / vLLM semantics)."""

from dataclasses import dataclass, field

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 is greedy. top_k <= 0 disables top-k; top_p 1.0 and min_p 0.0 disable theirs.
    max_tokens None means "until the model's context is full". `stop` strings are not included in the
    returned text; `stop_token_ids` and EOS end the sequence (the token is kept in `token_ids`).
    `logprobs=k` returns the sampled token's log-probability and the top-k alternatives per position.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name}: got {getattr(self, name)!r}, allowed {allowed}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "an integer >= 1")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise bad("temperature", ">= 0 (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "-1 or 0 (disabled) or an integer >= 1")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "in [0, 1]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "an integer >= 1 or None")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad("logprobs", f"an integer in [0, {MAX_LOGPROBS}] or None")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "an integer or None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
