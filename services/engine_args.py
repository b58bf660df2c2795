"""The options `ridgeline serve` and `ridgeline generate` share, with vLLM's names: the model (a directory or
a Hugging Face id, resolved before anything starts), the engine's knobs for all pools or one, logging."""

import argparse
import dataclasses
import json
from pathlib import Path

from engine import envs
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.documents import DocumentRecompute
from engine.kv.age_policy import KVAgePolicy, age_policy_from_dict
from engine.kv.kv_format import KV_CACHE_DTYPES
from engine.model_source import resolve_model
from engine.sampling_params import MAX_LOGPROBS
from engine.stat_logger import LOG_LEVELS

# engine knobs a pool may set apart (--prefill-X / --decode-X); the others are the same for every pool
POOL_KNOBS = (
    "num_blocks",
    "gpu_memory_utilization",
    "max_num_seqs",
    "max_num_batched_tokens",
    "enable_prefix_caching",
    "kv_cache_dtype",
    "kv_age_policy",
    "document_recompute",
    "max_document_blocks",
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help: argparse's, unless the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return text if "(default" in text else super()._get_help_string(action)


def fraction(value: str) -> float:
    """argparse type: a number in (0, 1]."""
    x = float(value)
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError(f"got {value}, allowed a fraction in (0, 1]")
    return x


def age_policy(value: str) -> KVAgePolicy:
    """argparse type: a KV age policy as JSON, e.g. '{"bits": 4, "sinks": 16, "window": 512}'."""
    try:
        fields = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"got {value!r}, allowed a JSON object ({e})") from None
    if not isinstance(fields, dict):
        raise argparse.ArgumentTypeError(f"got {value!r}, allowed a JSON object of KVAgePolicy's fields")
    try:
        return age_policy_from_dict(fields)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def document_recompute(value: str) -> dict:
    """argparse type: which tokens of reused documents are recomputed, JSON, e.g. '{"first_tokens": 16}' ->
    DocumentRecompute's fields, checked (a dict: serve configs stay JSON)."""
    try:
        fields = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"got {value!r}, allowed a JSON object ({e})") from None
    if not isinstance(fields, dict) or set(fields) - {"first_tokens", "ratio", "select_layer"}:
        raise argparse.ArgumentTypeError(
            f"got {value!r}, allowed a JSON object of first_tokens, ratio and select_layer"
        )
    try:
        return dataclasses.asdict(DocumentRecompute(**fields))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def non_negative_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"got {value}, allowed >= 0")
    return n


def positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"got {value}, allowed an integer >= 1")
    return n


def logprobs_cap(value: str) -> int:
    n = int(value)
    if not 0 <= n <= MAX_LOGPROBS:
        raise argparse.ArgumentTypeError(f"got {value}, allowed 0..{MAX_LOGPROBS}")
    return n


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --download-dir, --chat-template, --log-level: what `serve` and `generate` share."""
    p.add_argument(
        "--model",
        default=None,
        help="a checkpoint directory or a Hugging Face model id such as Qwen/Qwen3-0.6B, fetched through the "
        "Hugging Face cache (HF_TOKEN, HF_HOME; HF_HUB_OFFLINE=1: the cache only) (default: the reference "
        "model in models/, or $RIDGELINE_MODEL)",
    )
    p.add_argument(
        "--download-dir", default=None, help="the Hugging Face cache for a model id (default: $HF_HUB_CACHE)"
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="a chat template file, or the template itself, instead of the model's (default: the model "
        "directory's chat_template.jinja, else tokenizer_config.json's chat_template)",
    )
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="of Ridgeline's log lines")


def add_engine_arguments(p: argparse.ArgumentParser, pools: tuple[str, ...] = ()) -> None:
    """The engine's knobs (vLLM's names). Each defaults to None (the engine's default, shown); `pools`
    adds --POOL-KNOB for each POOL_KNOBS entry, which wins over --KNOB for that pool."""
    cache, sched, engine = CacheConfig(), SchedulerConfig(), EngineConfig(model="-")
    p.add_argument(
        "--max-model-len",
        type=positive_int,
        default=None,
        help="context length, prompt and output (default: the model's max_position_embeddings)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="engine seed: requests without a seed sample the same way on every start, as in vLLM "
        f"(default: {engine.seed})",
    )
    p.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="schedule each engine step while the device runs the one before (default: on a GPU)",
    )
    p.add_argument(
        "--quantization",
        choices=["fp8"],
        default=None,
        help="quantize the weights at load: fp8 = e4m3 with per-output-channel scales (default: none)",
    )
    p.add_argument(
        "--skinny-gemm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode-sized matmuls run a Triton split-K kernel where it measures faster than cuBLAS at "
        "start (default: on a GPU)",
    )
    knobs: list[tuple[str, dict]] = [
        ("num_blocks", dict(type=positive_int, help="KV cache blocks (default: from the memory budget)")),
        (
            "gpu_memory_utilization",
            dict(
                type=fraction,
                help="fraction of the GPU's memory the engine may use: the KV cache gets what the loaded model "
                "leaves of it (CUDA only; on the CPU the KV cache gets 512 MiB unless --num-blocks) "
                f"(default: {cache.gpu_memory_utilization})",
            ),
        ),
        (
            "max_num_seqs",
            dict(type=positive_int, help=f"requests running at once (default: {sched.max_num_seqs})"),
        ),
        (
            "max_num_batched_tokens",
            dict(
                type=positive_int,
                help=f"tokens computed per engine step (default: {sched.max_num_batched_tokens})",
            ),
        ),
        (
            "enable_prefix_caching",
            dict(
                action=argparse.BooleanOptionalAction,
                help="reuse the KV blocks of prompts' shared prefixes "
                f"(default: {cache.enable_prefix_caching})",
            ),
        ),
        (
            "kv_cache_dtype",
            dict(
                choices=list(KV_CACHE_DTYPES),
                help="the KV cache's format: auto = the activations' dtype, fp8 = e4m3 with per-(layer, KV "
                "head) scales, twice the blocks (default: auto)",
            ),
        ),
        (
            "kv_age_policy",
            dict(
                type=age_policy,
                help="KV precision by age, JSON: blocks past the first `sinks` tokens and older than the last "
                '`window` move to a `bits`-bit rotated pool, e.g. \'{"bits": 4, "sinks": 16, "window": 512}\' '
                "(default: none, every block in --kv-cache-dtype)",
            ),
        ),
        (
            "document_recompute",
            dict(
                type=document_recompute,
                help="RAG documents reused from the document cache: which of their tokens each prompt "
                'recomputes, JSON, e.g. \'{"first_tokens": 16, "ratio": 0.15}\' (EPIC: each document\'s first '
                "tokens; CacheBlend: that share of the rest, by K/V deviation at select_layer); a request's "
                "document_recompute overrides it (default: first_tokens 16, ratio 0)",
            ),
        ),
        (
            "max_document_blocks",
            dict(
                type=non_negative_int,
                help="KV blocks the document cache may hold (default: a quarter of the pool)",
            ),
        ),
    ]
    assert tuple(name for name, _ in knobs) == POOL_KNOBS
    for name, spec in knobs:
        flag = name.replace("_", "-")
        p.add_argument(f"--{flag}", dest=name, default=None, **spec)
        for pool in pools:
            p.add_argument(
                f"--{pool}-{flag}",
                dest=f"{pool}_{name}",
                default=None,
                **{**spec, "help": f"the {pool} pool's --{flag} (default: --{flag})"},
            )


def engine_options_of(args: argparse.Namespace, pool: str | None = None) -> dict:
    """The engine options the command line set (for `pool`, its own --POOL-KNOB first)."""
    options = {}
    for name in ("max_model_len", "seed", "async_scheduling", "skinny_gemm", "quantization", *POOL_KNOBS):
        value = getattr(args, f"{pool}_{name}", None) if pool else None
        value = getattr(args, name) if value is None else value
        if value is not None:
            options[name] = value
    return options


def model_of(args: argparse.Namespace) -> tuple[str, Path]:
    """The model as given (--model, else the default) and its local checkpoint directory: a Hub id is
    fetched, or found in the cache, now, before anything starts."""
    given = args.model if args.model is not None else str(envs.default_model_path())
    return given, resolve_model(given, args.download_dir)
