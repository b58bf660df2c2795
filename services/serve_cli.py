"""`ridgeline serve`: start (or join) Ray, deploy the app, print how to reach it, run until interrupted."""

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

from engine import envs

logger = logging.getLogger("ridgeline.serve")


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI API with prefill and decode pools on Ray Serve")
    p.add_argument(
        "--model",
        default=None,
        help="HF checkpoint directory (default: the reference model in models/, or $RIDGELINE_MODEL)",
    )
    p.add_argument("--served-model-name", default=None, help="the `model` clients send (default: dir name)")
    p.add_argument("--prefill", type=int, default=1, help="prefill replicas")
    p.add_argument("--decode", type=int, default=1, help="decode replicas")
    p.add_argument("--aggregated", action="store_true", help="one pool does prefill and decode")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key-file",
        default=None,
        help="require `Authorization: Bearer KEY`, KEY read from this file (or set $RIDGELINE_API_KEY)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="the key itself (visible to every user in `ps`: prefer --api-key-file or $RIDGELINE_API_KEY)",
    )
    p.add_argument(
        "--expose-worker-addresses",
        action="store_true",
        help="/v1/pools shows workers' pids, hosts and addresses (operators' debugging)",
    )
    p.add_argument("--kv-transport", default="auto", choices=["auto", "nixl", "ray"])
    p.add_argument(
        "--num-blocks", type=int, default=None, help="KV blocks per worker (default: memory budget)"
    )
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="weight dtype (the KV cache uses it too)",
    )
    p.add_argument("--worker-cpus", type=float, default=1.0, help="Ray CPUs reserved per worker replica")
    p.add_argument("--worker-gpus", type=float, default=None, help="GPUs per worker (default: 1 if CUDA)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    p.add_argument("--kv-dram-blocks", type=int, default=0, help="host-memory KV tier per worker, in blocks")
    p.add_argument("--kv-ssd-dir", default=None, help="SSD KV tier directory (a subdirectory per worker)")
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
    p.add_argument("--prefill-price", type=float, default=None, help="$ per hour per prefill replica")
    p.add_argument("--decode-price", type=float, default=None, help="$ per hour per decode replica")
    p.add_argument(
        "--device", default=None, help="what replicas run on, for /v1/pools and prices (cpu, H200, ...)"
    )
    p.add_argument("--spec", default=None, choices=["ngram"], help="speculative decoding by prompt lookup")
    p.add_argument(
        "--draft-model", default=None, help="speculative decoding with this draft model on CPU workers"
    )
    p.add_argument("--draft-workers", type=int, default=1, help="draft worker replicas (with --draft-model)")
    p.add_argument("--draft-cpus", type=float, default=1.0, help="CPUs per draft worker")
    p.add_argument(
        "--draft-wait",
        type=float,
        default=0.0,
        help="seconds a decode step waits for its drafts (0: pipelined, never waits)",
    )
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    # services.app imports ray, which reads its environment at import: not before run() has set it
    from services.app import ServeConfig

    model = args.model
    if model is None:
        model = str(envs.default_model_path())
    engine = {}
    if args.num_blocks is not None:
        engine["num_blocks"] = args.num_blocks
    if args.max_model_len is not None:
        engine["max_model_len"] = args.max_model_len
    gpus = args.worker_gpus
    if gpus is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
    pool = {
        "num_cpus": args.worker_cpus,
        "num_gpus": gpus,
        "engine": engine,
        "kv_dram_blocks": args.kv_dram_blocks,
        "kv_ssd_dir": args.kv_ssd_dir,
        "kv_ssd_blocks": args.kv_ssd_blocks,
        "kv_memory": args.kv_memory,
        "weight_dtype": args.dtype,
        "device": args.device,
    }
    return ServeConfig.model_validate(
        dict(
            model=model,
            served_model_name=args.served_model_name,
            mode="aggregated" if args.aggregated else "disaggregated",
            prefill={**pool, "replicas": args.prefill, "price_per_hour": args.prefill_price},
            decode={**pool, "replicas": args.decode, "price_per_hour": args.decode_price},
            kv_transport=args.kv_transport,
            api_key=api_key_of(args),
            router=args.router,
            expose_worker_addresses=args.expose_worker_addresses,
            registry=args.registry,
            registry_ttl_s=args.registry_ttl,
            spec="draft" if args.draft_model else (args.spec or "none"),
            num_speculative_tokens=args.num_speculative_tokens,
            draft={
                "model": args.draft_model,
                "replicas": args.draft_workers,
                "num_cpus": args.draft_cpus,
                "wait_s": args.draft_wait,
            }
            if args.draft_model
            else None,
        )
    )


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


def run(args: argparse.Namespace) -> int:
    if args.ray_address is None:  # before Ray is imported: it reads some of them at import
        os.environ.update(envs.local_cluster_env())  # inherited by the workers Ray starts here
    config = config_from_args(args)
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
            log_to_driver=False,
        )
    else:
        ray.init(address=args.ray_address, log_to_driver=False)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops it like Ctrl-C
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(config), name="ridgeline", route_prefix="/")
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
    parser = argparse.ArgumentParser(prog="ridgeline")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return config_from_args(parser.parse_args(argv))
