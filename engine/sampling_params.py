"""Per-request sampling parameters, validated at construction (OpenAI / vLLM semantics)."""

import logging
import math
from dataclasses import dataclass, field

from engine.errors import ParameterError
from engine.structured_output import StructuredOutputSpec

MAX_LOGPROBS = 20
GREEDY_BELOW = 1e-5  # a temperature under this is greedy (vLLM's _SAMPLING_EPS)
MIN_SAMPLING_TEMPERATURE = 1e-2  # lower ones overflow the tempered logits; raised to this (vLLM's _MAX_TEMP)
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, as vLLM's API takes it

logger = logging.getLogger("ridgeline.sampling")


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 (or under 1e-5) is greedy; one in [1e-5, 1e-2) is raised to 1e-2, as vLLM does, since
    smaller ones overflow the tempered logits. top_k <= 0 disables top-k (a top_k above the vocabulary keeps
    it all); top_p 1.0 and min_p 0.0 disable theirs. seed is an int64.
    max_tokens None means "until the model's context is full". `stop` strings are not included in the
    returned text; `stop_token_ids` and EOS end the sequence (the token is kept in `token_ids`).
    `logprobs=k` returns the sampled token's log-probability and the top-k alternatives per position.
    `presence_penalty` and `frequency_penalty` (in [-2, 2]) lower the logits of tokens already generated
    (once, and per occurrence); `repetition_penalty` (> 0, 1 is off) divides positive and multiplies
    negative logits of tokens in the prompt or output; `logit_bias` adds to token ids' logits (each in
    [-100, 100]); EOS and `stop_token_ids` cannot end a sequence before `min_tokens`
    (engine/logits_processors.py applies them). `structured_output` constrains the output to a JSON
    schema, any JSON object, a regex, a choice or a grammar (engine/structured_output.py).
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    structured_output: StructuredOutputSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0
        elif self.temperature < MIN_SAMPLING_TEMPERATURE:
            logger.warning(
                "temperature %g is below %g, which overflows the tempered logits; using %g",
                self.temperature,
                MIN_SAMPLING_TEMPERATURE,
                MIN_SAMPLING_TEMPERATURE,
            )
            self.temperature = MIN_SAMPLING_TEMPERATURE

    def _validate(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ParameterError(name, f"got {getattr(self, name)!r}, allowed {allowed}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "an integer >= 1")
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, int | float)
            or not 0.0 <= self.temperature < math.inf
        ):  # also rejects NaN
            raise bad("temperature", "a finite number >= 0 (0 means greedy)")
        if not isinstance(self.top_p, int | float) or math.isnan(self.top_p):
            raise bad("top_p", "in (0, 1]")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "-1 or 0 (disabled) or an integer >= 1")
        if not isinstance(self.min_p, int | float) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "in [0, 1]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "an integer >= 1 or None")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad("logprobs", f"an integer in [0, {MAX_LOGPROBS}] or None")
        if self.seed is not None and (
            not isinstance(self.seed, int)
            or isinstance(self.seed, bool)
            or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]
        ):
            raise bad("seed", f"an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] or None")
        if any(not isinstance(s, str) or not s for s in self.stops):
            raise bad("stop", "non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "non-negative integers")
        self._validate_penalties(bad)

    def _validate_penalties(self, bad) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise bad(name, "a number in [-2, 2]")
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty < math.inf:
            raise bad("repetition_penalty", "a finite number > 0 (1 means off)")
        if self.logit_bias is not None and any(
            not isinstance(t, int)
            or isinstance(t, bool)
            or t < 0
            or not _is_number(v)
            or not -100 <= v <= 100
            for t, v in self.logit_bias.items()
        ):
            raise bad("logit_bias", "token id (>= 0) -> bias in [-100, 100]")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"at most max_tokens ({self.max_tokens})")
        if self.structured_output is not None and not isinstance(
            self.structured_output, StructuredOutputSpec
        ):
            raise bad("structured_output", "a StructuredOutputSpec or None")

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids the parameters name must be the model's (ParameterError naming the field)."""
        for name, ids in (
            ("logit_bias", list(self.logit_bias or {})),
            ("stop_token_ids", self.stop_token_ids),
        ):
            if any(t >= vocab_size for t in ids):
                raise ParameterError(name, f"token ids must be below the vocabulary size {vocab_size}")

    @property
    def stops(self) -> list[str]:
        """The stop strings (`stop` is always a list once constructed)."""
        return self.stop if isinstance(self.stop, list) else []

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
