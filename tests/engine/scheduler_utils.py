"""The real scheduler with no model (vLLM's tests/v1/core/utils.py): create_scheduler, create_requests, and
a step that samples a fixed token for every request whose scheduled tokens reach its end."""

from engine.config import SchedulerConfig
from engine.kv.block_hash import update_block_hashes
from engine.kv.block_manager import BlockManager
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Sampled, Scheduler, SchedulerOutput


def create_scheduler(
    num_blocks: int = 64,
    block_size: int = 16,
    max_num_batched_tokens: int = 256,
    max_num_seqs: int = 16,
    policy: str = "fcfs",
    enable_prefix_caching: bool = True,
    enable_chunked_prefill: bool = True,
    max_model_len: int = 1024,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        policy=policy,
        enable_chunked_prefill=enable_chunked_prefill,
    )
    return Scheduler(config, BlockManager(num_blocks, block_size, enable_prefix_caching), max_model_len)


def create_requests(
    n: int,
    prompt_len: int = 20,
    max_tokens: int = 8,
    priority: int = 0,
    preemptible: bool = True,
    prefix: str = "r",
    stop_token_ids: list[int] | None = None,
) -> list[Request]:
    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, stop_token_ids=stop_token_ids
    )
    requests = []
    for i in range(n):
        req = Request(
            f"{prefix}{i}",
            [(7 * i + t) % 500 + 3 for t in range(prompt_len)],
            params,
            priority=priority,
            preemptible=preemptible,
        )
        update_block_hashes(req, 16)
        requests.append(req)
    return requests


class NoStopStrings:
    """The StopChecker of requests without stop strings (nothing is detokenized)."""

    def stop_string(self, req: Request) -> str | None:
        return None

    def finalize(self, req: Request, ends_here: bool) -> None:
        return None


def sample_fixed(sched: SchedulerOutput, token: int = 9) -> list[Sampled]:
    """What a runner would sample: one token for every request whose scheduled tokens reach its end."""
    return [
        Sampled(req, [token], [None])
        for req, n in sched.scheduled
        if req.num_computed_tokens + n >= req.num_tokens
    ]


def run_step(scheduler: Scheduler, token: int = 9) -> SchedulerOutput:
    """schedule -> (no model) sample -> update, as LLMEngine.step does."""
    sched = scheduler.schedule()
    scheduler.update_from_output(sched, sample_fixed(sched, token), NoStopStrings())
    return sched
