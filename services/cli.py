"""The `ridgeline` command."""

import argparse
import sys
from importlib.metadata import entry_points

from engine import LLM, SamplingParams
from engine.tiny_model import ARCHS, make_tiny_model
from services.serve_cli import add_parser as add_serve_parser

# subcommands that live outside services/ (the load generator is benchmarks/'s): pyproject's entry points
SUBCOMMANDS = "ridgeline.subcommands"


def _generate(args: argparse.Namespace) -> int:
    options = {"device": args.device} if args.device else {}
    if args.speculative_model:
        options |= {
            "speculative_model": args.speculative_model,
            "num_speculative_tokens": args.num_speculative_tokens,
        }
    llm = LLM(args.model, dtype=args.dtype, **options)
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.seed,
        n=args.n,
        stop=args.stop or None,
        ignore_eos=args.ignore_eos,
    )
    prompts = args.prompt or ["Hello"]
    if args.chat:
        outputs = [llm.chat([{"role": "user", "content": p}], params)[0] for p in prompts]
    else:
        outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs, strict=True):
        for completion in out.outputs:
            print(
                f"{prompt!r} -> {completion.text!r}  "
                f"[{len(completion.token_ids)} tokens, {completion.finish_reason}]"
            )
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    path = make_tiny_model(args.out_dir, args.arch, seed=args.seed, dtype=args.dtype)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ridgeline", description="Disaggregated LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text offline with the engine (no Ray)")
    gen.add_argument(
        "--model",
        default=None,
        help="HF checkpoint directory (default: the reference model in models/, or $RIDGELINE_MODEL)",
    )
    gen.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat message")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--stop", action="append")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--device", default=None)
    gen.add_argument(
        "--speculative-model",
        default=None,
        help="speculative decoding with this draft model (same tokenizer), on the same device",
    )
    gen.add_argument("--num-speculative-tokens", type=int, default=4)
    gen.set_defaults(func=_generate)
    add_serve_parser(sub)

    sub.add_parser(
        "bench",
        help="load an OpenAI-compatible server: latency, goodput, tokens per dollar (ridgeline bench --help)",
        add_help=False,
    )

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random HF checkpoint")
    tiny.add_argument("out_dir")
    tiny.add_argument("--arch", default="llama", choices=sorted(ARCHS))
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    tiny.set_defaults(func=_make_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    external = {ep.name: ep for ep in entry_points(group=SUBCOMMANDS)}
    if argv[:1] and argv[0] in external:  # its own parser (bench has a `compare` form besides the flags)
        return external[argv[0]].load()(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
