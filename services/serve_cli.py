"""`ridgeline serve`: start (or join) Ray, deploy the app, print how to reach it, run until interrupted. The
options it shares with `generate` are services/engine_args.py's."""

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

from pydantic import ValidationError

from engine import envs
from engine.model_source import resolve_model, served_model_name
from engine.sampling_params import MAX_LOGPROBS
from engine.stat_logger import configure_logging
from engine.tokenizer import load_chat_template
from services.engine_args import (
    HelpFormatter,
    add_engine_arguments,
    add_model_arguments,
    engine_options_of,
    logprobs_cap,
    model_of,
)

logger = logging.getLogger("ridgeline.serve")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the OpenAI API with prefill and decode pools on Ray Serve",
        formatter_class=HelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the `model` clients send (default: the directory's name, or the model id as given)",
    )
    add_engine_arguments(p, pools=("prefill", "decode"))
    p.add_argument(
        "--max-logprobs",
        type=logprobs_cap,
        default=MAX_LOGPROBS,
        help="the most logprobs per token a request may ask for; more is a 400",
    )
    p.add_argument(
        "--stats-interval",
        type=float,
        default=10.0,
        help="seconds between each worker's engine stats lines while it works (0: none)",
    )
    p.add_argument("--prefill", type=int, default=1, help="prefill replicas")
    p.add_argument("--decode", type=int, default=1, help="decode replicas")
    p.add_argument("--aggregated", action="store_true", help="one pool does prefill and decode")
    p.add_argument("--host", default="127.0.0.1", help="the HTTP address")
    p.add_argument("--port", type=int, default=8000, help="the HTTP port")
    p.add_argument(
        "--api-key-file",
        default=None,
        help="require `Authorization: Bearer KEY`, KEY read from this file (default: $RIDGELINE_API_KEY, "
        "else no key)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="the key itself (visible to every user in `ps`: prefer --api-key-file or $RIDGELINE_API_KEY) "
        "(default: none)",
    )
    p.add_argument(
        "--expose-worker-addresses",
        action="store_true",
        help="/v1/pools shows workers' pids, hosts and addresses (operators' debugging)",
    )
    p.add_argument(
        "--kv-transport",
        default="auto",
        choices=["auto", "nixl", "ray"],
        help="how KV blocks move from prefill to decode (auto: NIXL when it starts, else Ray)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="weight dtype (the KV cache uses it too)",
    )
    p.add_argument("--worker-cpus", type=float, default=1.0, help="Ray CPUs reserved per worker replica")
    p.add_argument("--worker-gpus", type=float, default=None, help="GPUs per worker (default: 1 if CUDA)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start one here)")
    p.add_argument("--kv-dram-blocks", type=int, default=0, help="host-memory KV tier per worker, in blocks")
    p.add_argument(
        "--kv-ssd-dir", default=None, help="SSD KV tier directory, a subdirectory per worker (default: none)"
    )
    p.add_argument("--kv-ssd-blocks", type=int, default=0, help="SSD KV tier capacity per worker, in blocks")
    p.add_argument(
        "--router",
        default="kv_aware",
        choices=["kv_aware", "least_loaded"],
        help="how prompts pick a replica: where their KV already is, or by load only",
    )
    p.add_argument(
        "--kv-memory",
        default="replica",
        choices=["replica", "node"],
        help="node: one KV memory service per node holds the DRAM/SSD tiers for all its workers",
    )
    p.add_argument(
        "--registry",
        default="embedded",
        help="where workers and pools register: embedded (a Ray actor) or etcd://HOST:PORT",
    )
    p.add_argument(
        "--registry-ttl",
        type=float,
        default=10.0,
        help="seconds after which a worker that stopped heartbeating leaves the registry",
    )
    p.add_argument(
        "--prefill-price",
        type=float,
        default=None,
        help="$ per hour per prefill replica (default: a list rate for its GPUs and CPUs)",
    )
    p.add_argument(
        "--decode-price",
        type=float,
        default=None,
        help="$ per hour per decode replica (default: a list rate for its GPUs and CPUs)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="what replicas run on, for /v1/pools and prices: cpu, H200, ... (default: cpu, or gpu with GPUs)",
    )
    p.add_argument(
        "--spec",
        default=None,
        choices=["ngram"],
        help="speculative decoding by prompt lookup (default: none)",
    )
    p.add_argument(
        "--draft-model",
        default=None,
        help="speculative decoding with this draft model (a directory or a Hugging Face id) on CPU workers "
        "(default: none)",
    )
    p.add_argument("--draft-workers", type=int, default=1, help="draft worker replicas (with --draft-model)")
    p.add_argument("--draft-cpus", type=float, default=1.0, help="CPUs per draft worker")
    p.add_argument(
        "--draft-wait",
        type=float,
        default=0.0,
        help="seconds a decode step waits for its drafts (0: pipelined, never waits)",
    )
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="drafted tokens per decode step")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The ServeConfig of the command line; ValueError (one line) for a bad model, template or value. The
    model is resolved here, before Ray starts: a Hub id becomes its snapshot directory when Ray is local
    (replicas elsewhere resolve the id themselves, from their own cache)."""
    # services.app imports ray, which reads its environment at import: not before run() has set it
    from services.app import ServeConfig

    given, path = model_of(args)
    name = args.served_model_name or served_model_name(given)
    model = str(path) if args.ray_address is None or args.model is None else args.model
    draft_model = args.draft_model
    if draft_model is not None:
        draft_path = resolve_model(draft_model, args.download_dir)
        draft_model = str(draft_path) if args.ray_address is None else draft_model
    gpus = args.worker_gpus
    if gpus is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
    pool = {
        "num_cpus": args.worker_cpus,
        "num_gpus": gpus,
        "kv_dram_blocks": args.kv_dram_blocks,
        "kv_ssd_dir": args.kv_ssd_dir,
        "kv_ssd_blocks": args.kv_ssd_blocks,
        "kv_memory": args.kv_memory,
        "weight_dtype": args.dtype,
        "device": args.device,
    }
    fields = dict(
        model=model,
        served_model_name=name,
        chat_template=load_chat_template(args.chat_template) if args.chat_template else None,
        max_logprobs=args.max_logprobs,
        download_dir=args.download_dir,
        log_level=args.log_level,
        stats_interval_s=args.stats_interval,
        mode="aggregated" if args.aggregated else "disaggregated",
        prefill={
            **pool,
            "engine": engine_options_of(args, "prefill"),
            "replicas": args.prefill,
            "price_per_hour": args.prefill_price,
        },
        decode={
            **pool,
            "engine": engine_options_of(args, "decode"),
            "replicas": args.decode,
            "price_per_hour": args.decode_price,
        },
        kv_transport=args.kv_transport,
        api_key=api_key_of(args),
        router=args.router,
        expose_worker_addresses=args.expose_worker_addresses,
        registry=args.registry,
        registry_ttl_s=args.registry_ttl,
        spec="draft" if args.draft_model else (args.spec or "none"),
        num_speculative_tokens=args.num_speculative_tokens,
        draft={
            "model": draft_model,
            "replicas": args.draft_workers,
            "num_cpus": args.draft_cpus,
            "wait_s": args.draft_wait,
        }
        if args.draft_model
        else None,
    )
    try:
        return ServeConfig.model_validate(fields)
    except ValidationError as e:  # one line per problem, naming the field, not pydantic's layout
        raise ValueError("; ".join(_problem(err) for err in e.errors())) from None


def _problem(err) -> str:
    where = ".".join(str(part) for part in err["loc"])
    message = err["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def api_key_of(args: argparse.Namespace) -> str | None:
    """--api-key-file, else --api-key (with a warning: it shows in `ps`), else $RIDGELINE_API_KEY."""
    if args.api_key_file is not None and args.api_key is not None:
        raise ValueError("api key: give --api-key-file or --api-key, not both")
    if args.api_key_file is not None:
        try:
            key = Path(args.api_key_file).read_text().strip()
        except OSError as e:
            raise ValueError(f"--api-key-file: cannot read {args.api_key_file} ({e.strerror})") from None
        if not key:
            raise ValueError(f"--api-key-file: {args.api_key_file} is empty")
        return key
    if args.api_key is not None:
        logger.warning(
            "--api-key shows the key to every user of this machine (ps, /proc); use --api-key-file "
            "or RIDGELINE_API_KEY"
        )
        return args.api_key
    return envs.api_key()


def banner(config, host: str, port: int) -> str:
    url = f"http://{host}:{port}"
    auth = ' -H "Authorization: Bearer $RIDGELINE_API_KEY"' if config.api_key else ""
    pools = (
        f"{config.prefill.replicas} prefill + {config.decode.replicas} decode"
        if config.mode == "disaggregated"
        else f"{config.decode.replicas} aggregated"
    )
    return (
        f"Ridgeline is serving {config.model_name!r} ({pools} replicas) at {url}/v1\n"
        f"Try:\n  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} \\\n"
        f'    -d \'{{"model": "{config.model_name}", "prompt": "The quick brown fox", "max_tokens": 16}}\''
    )


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def serve_logging(level: str) -> dict:
    """Ray Serve's own logging at our level; its per-request access lines only at debug (the frontend logs
    one line per request itself)."""
    return {"log_level": level.upper(), "enable_access_log": level == "debug"}


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    if args.ray_address is None:  # before Ray is imported: it reads some of them at import
        os.environ.update(envs.local_cluster_env())  # inherited by the workers Ray starts here
    config = config_from_args(args)  # a bad model or option fails here, before Ray starts
    # Ray reads its environment at import: what imports it comes after the update above
    import ray
    from ray import serve

    from services.app import build_app
    from services.kv_memory.service import shutdown_services
    from services.registry_actor import shutdown_registry

    if args.ray_address is None:
        need = (
            config.frontend_num_cpus
            + config.decode.num_cpus * config.decode.replicas
            + (config.prefill.num_cpus * config.prefill.replicas if config.mode == "disaggregated" else 0)
            + (config.draft.num_cpus * config.draft.replicas if config.draft else 0)
        )
        ray.init(
            num_cpus=max(os.cpu_count() or 1, int(need + 1)),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            dashboard_host="127.0.0.1",
            log_to_driver=True,  # the replicas' log lines (requests, engine stats, errors) on this console
        )
    else:
        ray.init(address=args.ray_address, log_to_driver=True)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops it like Ctrl-C
    try:
        logs = serve_logging(args.log_level)
        serve.start(http_options={"host": args.host, "port": args.port}, logging_config=logs)
        serve.run(build_app(config), name="ridgeline", route_prefix="/", logging_config=logs)
        print(banner(config, args.host, args.port), flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:  # also while the app was still deploying: everything started is stopped
        pass
    print("shutting down", flush=True)
    serve.shutdown()
    shutdown_services()
    shutdown_registry()
    ray.shutdown()
    return 0


def config_for_argv(argv: list[str]):
    """The ServeConfig that `ridgeline <argv>` would deploy, without starting anything."""
    parser = argparse.ArgumentParser(prog="ridgeline", formatter_class=HelpFormatter)
    add_parser(parser.add_subparsers(dest="command", required=True))
    return config_from_args(parser.parse_args(argv))
