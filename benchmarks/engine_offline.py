"""Offline engine throughput: prefill and decode tokens/s, beside HF transformers on the same model.

    python -m benchmarks.engine_offline [--arch llama] [--batch 8] [--prompt-len 128] [--gen-len 64]

Prefill is timed as the steps that compute the prompts (max_tokens=1); decode as the steps after every
request has its first token. transformers runs the same batch (equal-length prompts, no padding):
one forward over the prompts, then `generate` with greedy decoding.
"""

import argparse
import statistics
import tempfile
import time

import torch

from benchmarks.results_io import write_result
from engine import LLMEngine, SamplingParams
from engine.request import EngineRequest
from engine.tiny_model import make_tiny_model

# a small model rather than the test-sized one, so the matmuls, not Python, dominate a step
SIZES = {
    "tiny": dict(),
    "small": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
    ),
}


def _prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(4, vocab, (length,), generator=gen).tolist() for _ in range(batch)]


def ours(path: str, prompts: list[list[int]], gen_len: int) -> dict:
    engine = LLMEngine.from_pretrained(
        path,
        max_num_batched_tokens=sum(map(len, prompts)),
        max_num_seqs=len(prompts),
        enable_prefix_caching=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=gen_len, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(str(i), p, params))
    t0 = time.perf_counter()
    engine.step()  # the whole batch's prompts in one step
    t1 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    t2 = time.perf_counter()
    prompt_tokens = sum(map(len, prompts))
    decode_tokens = len(prompts) * (gen_len - 1)
    return {
        "prefill_tokens_per_s": prompt_tokens / (t1 - t0),
        "decode_tokens_per_s": decode_tokens / (t2 - t1),
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "steps": engine.stats.steps,
    }


@torch.inference_mode()
def transformers_peer(path: str, prompts: list[list[int]], gen_len: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    model(ids)
    t1 = time.perf_counter()
    model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_len, do_sample=False, pad_token_id=0
    )
    t2 = time.perf_counter()
    decode_s = (t2 - t1) - (t1 - t0)  # generate = one prefill + (gen_len - 1) decode steps
    return {
        "prefill_tokens_per_s": ids.numel() / (t1 - t0),
        "decode_tokens_per_s": len(prompts) * (gen_len - 1) / decode_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(SIZES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            path = str(make_tiny_model(f"{tmp}/{size}", "llama", max_position_embeddings=1024, **SIZES[size]))
            vocab = LLMEngine.from_pretrained(path, num_blocks=1).model_config.vocab_size
            for batch in args.batches:
                prompts = _prompts(batch, args.prompt_len, vocab)
                ours(path, prompts, 4)  # warm-up
                # alternate the two over several repeats and keep medians: this machine's timing is noisy
                runs = [
                    (ours(path, prompts, args.gen_len), transformers_peer(path, prompts, args.gen_len))
                    for _ in range(args.repeats)
                ]
                r = {k: statistics.median(o[k] for o, _ in runs) for k in runs[0][0]}
                hf = {k: statistics.median(h[k] for _, h in runs) for k in runs[0][1]}
                row = {
                    "model": size,
                    "batch": batch,
                    "prompt_len": args.prompt_len,
                    "gen_len": args.gen_len,
                    **{k: round(v, 4) for k, v in r.items()},
                    "hf_prefill_tokens_per_s": round(hf["prefill_tokens_per_s"], 1),
                    "hf_decode_tokens_per_s": round(hf["decode_tokens_per_s"], 1),
                }
                row["prefill_ratio_vs_hf"] = round(
                    row["prefill_tokens_per_s"] / row["hf_prefill_tokens_per_s"], 3
                )
                row["decode_ratio_vs_hf"] = round(
                    row["decode_tokens_per_s"] / row["hf_decode_tokens_per_s"], 3
                )
                rows.append(row)
                print(row)
    path = write_result(
        "engine_offline_cpu",
        {
            "dtype": "float32",
            "torch": torch.__version__,
            "repeats": args.repeats,
            "statistic": "median",
            "rows": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
