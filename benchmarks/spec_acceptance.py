"""How well the reference draft model predicts the reference target, through the engine's own speculative
decoding: greedy acceptance rate and mean accepted length on held-out prompts, for several draft lengths k,
beside prompt-lookup (ngram) drafting on the same prompts, with wall times against plain decoding.

    python -m benchmarks.spec_acceptance                          # models/ pair, GPU if there is one
    python -m benchmarks.spec_acceptance --prompts 8 --max-tokens 32    # quicker on a CPU

Prompts are the first `--prompt-tokens` tokens of held-out stdlib files (benchmarks/train_reference.py's
split, never trained on). Every run is greedy and must equal plain decoding token for token; the JSON says
how many sequences did. Acceptance rate = accepted / drafted tokens; mean accepted length = accepted drafts
per verify step (a verify step yields that plus one token). The engine adapts each request's draft length
to its acceptance (shorter after mostly-rejected drafts), so `drafted` is what it chose to draft.
"""

import argparse
import time
from pathlib import Path

import torch

from benchmarks.results_io import write_result
from benchmarks.train_reference import corpus
from engine import LLM, SamplingParams
from engine.tokenizer import Tokenizer

MODELS = Path(__file__).resolve().parents[1] / "models"


def heldout_prompts(model: str, count: int, prompt_tokens: int) -> list[list[int]]:
    tok = Tokenizer(model)
    prompts = []
    for text in corpus()["heldout"]:
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) >= 2 * prompt_tokens:
            prompts.append(ids[:prompt_tokens])
        if len(prompts) == count:
            break
    return prompts


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams, batched: bool) -> tuple[list, float]:
    """(token ids per prompt, seconds) — all prompts in one batch, or one after another."""
    if llm.engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if batched:
        outs = llm.generate(prompts, params)
    else:
        outs = [llm.generate([p], params)[0] for p in prompts]
    if llm.engine.device.type == "cuda":
        torch.cuda.synchronize()
    return [o.outputs[0].token_ids for o in outs], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default=str(MODELS / "ridgeline-ref-target"))
    parser.add_argument("--draft", default=str(MODELS / "ridgeline-ref-draft"))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--k", default="2,4,6", help="draft lengths (num_speculative_tokens), comma-separated"
    )
    parser.add_argument("--dtype", default="auto", help="the engines' dtype (auto: the checkpoints' bf16)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    prompts = heldout_prompts(args.target, args.prompts, args.prompt_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    common = dict(num_blocks=4096, max_num_seqs=max(64, len(prompts)), dtype=args.dtype)
    plain = LLM(args.target, **common)
    run(plain, prompts[:2], params, batched=True)  # warm-up: kernels compiled, graphs captured
    runs = {}
    for mode in ("batched", "sequential"):
        reference, seconds = run(plain, prompts, params, batched=mode == "batched")
        runs[mode] = {"plain": {"seconds": round(seconds, 3)}}
        configs = [
            (f"draft_model_k{k}", dict(speculative_model=args.draft, num_speculative_tokens=k))
            for k in map(int, args.k.split(","))
        ]
        configs.append(("ngram_k4", dict(speculative_method="ngram", num_speculative_tokens=4)))
        for name, options in configs:
            llm = LLM(args.target, **common, **options)
            run(llm, prompts[:2], params, batched=True)
            before = vars(llm.engine.stats).copy()
            got, seconds = run(llm, prompts, params, batched=mode == "batched")
            stats = {
                key: value - before.get(key, 0)
                for key, value in vars(llm.engine.stats).items()
                if isinstance(value, int | float)
            }
            drafted, accepted, verifies = (
                stats["spec_draft_tokens"],
                stats["spec_accepted_tokens"],
                stats["spec_verifications"],
            )
            runs[mode][name] = {
                "seconds": round(seconds, 3),
                "speedup_vs_plain": round(runs[mode]["plain"]["seconds"] / seconds, 3),
                "identical_to_plain": sum(a == b for a, b in zip(got, reference, strict=True)),
                "drafted": drafted,
                "accepted": accepted,
                "verify_steps": verifies,
                "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
                "mean_accepted_length": round(accepted / verifies, 3) if verifies else None,
                "target_steps": stats["steps"],
            }
            print(mode, name, runs[mode][name], flush=True)
            del llm
    payload = {
        "target": Path(args.target).name,
        "draft": Path(args.draft).name,
        "dtype": args.dtype,
        "prompts": len(prompts),
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "runs": runs,
        "note": "greedy; prompts are held-out stdlib files' first tokens; verify steps run eager, plain "
        "decode steps replay CUDA graphs on the GPU; the draft model runs on the same device",
    }
    suffix = ("_gpu" if torch.cuda.is_available() else "_cpu") + (
        "" if args.dtype == "auto" else f"_{args.dtype}"
    )
    print(write_result("spec_acceptance" + suffix, payload, Path(args.out) if args.out else None))


if __name__ == "__main__":
    main()
