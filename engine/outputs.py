"""What the engine returns, in vLLM's shape: RequestOutput.outputs[i].text / .token_ids."""

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ComputeUsage:
    """Engine time spent on a request: every step's wall time is split evenly over the tokens it computed,
    prompt (prefill) and generated-position (decode) tokens counted apart. Summed over a run, the requests'
    seconds equal the engine's busy seconds (EngineStats.busy_seconds)."""

    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    def __add__(self, other: "ComputeUsage") -> "ComputeUsage":
        return ComputeUsage(
            self.prefill_seconds + other.prefill_seconds,
            self.decode_seconds + other.decode_seconds,
            self.prefill_tokens + other.prefill_tokens,
            self.decode_tokens + other.decode_tokens,
        )

    def __sub__(self, other: "ComputeUsage") -> "ComputeUsage":
        return ComputeUsage(
            self.prefill_seconds - other.prefill_seconds,
            self.decode_seconds - other.decode_seconds,
            self.prefill_tokens - other.prefill_tokens,
            self.decode_tokens - other.decode_tokens,
        )


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    compute: ComputeUsage = field(default_factory=ComputeUsage)  # engine time spent on it, cumulative
    draft_compute: ComputeUsage = field(default_factory=ComputeUsage)  # a remote draft pool's, cumulative
    # wall-clock (arrival, first scheduled) at the engine, once scheduled: queue time and traces
    queued: tuple[float, float] | None = None
    # pool name -> compute, when several engines served it (the Ray pools); empty from a single engine
    compute_by_pool: dict[str, ComputeUsage] = field(default_factory=dict)
