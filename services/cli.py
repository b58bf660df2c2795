"""The `ridgeline` command."""

import argparse
import sys
from importlib.metadata import entry_points

# Nothing from engine/ (or services/, whose modules import it) at the top: `import engine` is torch and
# transformers, seconds of start-up that `ridgeline bench` (an HTTP client, benchmarks/'s) never uses. Each
# function below imports what it needs.

# subcommands that live outside services/ (the load generator is benchmarks/'s): pyproject's entry points
SUBCOMMANDS = "ridgeline.subcommands"


def _generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams
    from engine.stat_logger import configure_logging
    from services.engine_args import engine_options_of, model_of

    configure_logging(args.log_level)
    _, model = model_of(args)  # a bad model fails here, in one line, before anything loads
    options = engine_options_of(args)
    if args.device:
        options["device"] = args.device
    if args.chat_template:
        options["chat_template"] = args.chat_template
    if args.download_dir:
        options["download_dir"] = args.download_dir
    if args.speculative_model:
        options |= {
            "speculative_model": args.speculative_model,
            "num_speculative_tokens": args.num_speculative_tokens,
        }
    llm = LLM(str(model), dtype=args.dtype, **options)
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.sampling_seed,
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
    from engine.tiny_model import make_tiny_model

    path = make_tiny_model(args.out_dir, args.arch, seed=args.seed, dtype=args.dtype)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from engine.tiny_model import ARCHS
    from services.engine_args import HelpFormatter, add_engine_arguments, add_model_arguments
    from services.serve_cli import add_parser as add_serve_parser

    parser = argparse.ArgumentParser(
        prog="ridgeline", description="Disaggregated LLM serving", formatter_class=HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate", help="generate text offline with the engine (no Ray)", formatter_class=HelpFormatter
    )
    add_model_arguments(gen)
    gen.add_argument("--prompt", action="append", help="prompt text; repeat for a batch (default: Hello)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat message")
    gen.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: off)")
    gen.add_argument(
        "--sampling-seed",
        type=int,
        default=None,
        help="the requests' own seed (SamplingParams.seed; independent of the batch) (default: none)",
    )
    gen.add_argument("--n", type=int, default=1, help="completions per prompt")
    gen.add_argument("--stop", action="append", help="stop string; repeat for several (default: none)")
    gen.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    gen.add_argument(
        "--dtype", default="auto", help="weight dtype: auto (the checkpoint's), float32, bfloat16, float16"
    )
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    add_engine_arguments(gen)
    gen.add_argument(
        "--speculative-model",
        default=None,
        help="speculative decoding with this draft model (same tokenizer), on the same device (default: none)",
    )
    gen.add_argument("--num-speculative-tokens", type=int, default=4, help="drafted tokens per step")
    gen.set_defaults(func=_generate)
    add_serve_parser(sub)

    sub.add_parser(
        "bench",
        help="load an OpenAI-compatible server: latency, goodput, tokens per dollar (ridgeline bench --help)",
        add_help=False,
    )

    tiny = sub.add_parser(
        "make-tiny-model", help="write a tiny random HF checkpoint", formatter_class=HelpFormatter
    )
    tiny.add_argument("out_dir", help="where to write it")
    tiny.add_argument("--arch", default="llama", choices=sorted(ARCHS), help="model family")
    tiny.add_argument("--seed", type=int, default=0, help="of the random weights")
    tiny.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype"
    )
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
