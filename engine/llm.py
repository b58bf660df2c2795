"""The offline API: LLM(path).generate(prompts, params) and .chat(messages)."""

import itertools
from typing import cast

from engine.envs import default_model_path
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams

Prompt = str | list[int]


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


class LLM:
    """Runs the engine in this process (no Ray): `LLM(model, **engine_options)`.

    model: a checkpoint directory or a Hugging Face Hub id ("org/name", through the Hugging Face cache;
    HF_HUB_OFFLINE=1 reads the cache only). Engine options are the fields of EngineConfig, CacheConfig and
    SchedulerConfig, e.g. `dtype`, `max_model_len`, `seed`, `chat_template`, `max_logprobs`, `num_blocks`,
    `gpu_memory_utilization`, `enable_prefix_caching`, `max_num_seqs`, `max_num_batched_tokens`,
    `scheduling_policy`.
    """

    def __init__(self, model: str | None = None, **engine_options):
        if model is None:
            model = str(default_model_path())
        self.engine = LLMEngine.from_pretrained(model, **engine_options)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list | None = None,
        *,
        priority: list[int] | None = None,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        priority = priority or [0] * len(prompts)
        requests = [
            EngineRequest(
                f"offline-{next(self._ids)}",
                prompt,
                p or SamplingParams(),
                priority=prio,
                cache_salt=cache_salt,
                stream=False,
            )
            for prompt, p, prio in zip(prompts, params, priority, strict=True)
        ]
        return self.engine.run(requests)

    def chat(
        self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None, **kwargs
    ) -> list[RequestOutput]:
        if messages and isinstance(messages[0], dict):
            conversations = [messages]
        else:
            conversations = cast(list[list[dict]], messages)
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        return self.generate(prompts, sampling_params, **kwargs)
