"""What structured outputs add to a decode step: the grammar's per-step work beside the step it joins.

    python -m benchmarks.structured_output_overhead                 # this CPU
    python -m benchmarks.structured_output_overhead --device cuda   # fill on the CPU, apply on the GPU

Every request of a batch (B = 1, 8, 64) is constrained by one realistic JSON schema (typed fields, an enum,
an array) with the reference model's tokenizer and logits width. Each request is fed the tokens of its own
valid document (as a model that follows the schema would produce them; a finished document ends with the
stop token and the request starts over with a fresh matcher, untimed). Per step, timed separately and
over the walk (mean and median): fill_bitmasks for all B rows (CPU), apply_bitmask to [B, V] float32 logits
on the device (the CPU -> GPU bitmask copy included), accept_token for each row. Compared with, in the same
run: the engine sampler's softmax + exponential-race draw over the same logits on the device (a floor of any
step's sampling) and LLMEngine.step() of the reference model decoding B requests (the step the grammar joins).
"""

import argparse
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.results_io import write_result
from engine import LLMEngine, SamplingParams
from engine.request import EngineRequest
from engine.structured_output import (
    GrammarCompilerCache,
    GrammarMatcher,
    StructuredOutputSpec,
    allocate_bitmask,
    apply_bitmask,
    fill_bitmasks,
)

REF_MODEL = Path(__file__).resolve().parents[1] / "models" / "ridgeline-ref-target"
STATUSES = ["pending", "shipped", "delivered", "cancelled"]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "order_id": {"type": "integer", "minimum": 1},
        "customer": {"type": "string", "maxLength": 40},
        "email": {"type": "string"},
        "status": {"enum": STATUSES},
        "total": {"type": "number", "minimum": 0},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}},
                "required": ["sku", "quantity"],
            },
            "maxItems": 4,
        },
        "gift": {"type": "boolean"},
    },
    "required": ["order_id", "customer", "email", "status", "total", "items", "gift"],
}
_NAMES = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov", "Ken Thompson"]
WARMUP = 8


def documents(count: int, seed: int = 0) -> list[str]:
    """Valid instances of SCHEMA, as a model following it would write them."""
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        name = rng.choice(_NAMES)
        doc = {
            "order_id": rng.randint(1, 10**6),
            "customer": name,
            "email": name.lower().replace(" ", ".") + "@example.com",
            "status": rng.choice(STATUSES),
            "total": round(rng.uniform(1, 500), 2),
            "items": [
                {"sku": f"SKU-{rng.randint(100, 999)}", "quantity": rng.randint(1, 5)}
                for _ in range(rng.randint(1, 4))
            ],
            "gift": i % 2 == 0,
        }
        docs.append(json.dumps(doc))
    return docs


class Walk:
    """B requests, each fed its own documents' tokens; restarts a request (untimed) once it terminated."""

    def __init__(self, cache: GrammarCompilerCache, token_docs: list[list[int]], batch: int):
        self.cache, self.spec = cache, StructuredOutputSpec(json=SCHEMA)
        self.docs = token_docs
        self.stop = cache.stop_token_ids[0]
        self.matchers: list[GrammarMatcher | None] = [cache.matcher(self.spec) for _ in range(batch)]
        self.pending = [list(token_docs[i % len(token_docs)]) + [self.stop] for i in range(batch)]
        self.started = batch

    def next_tokens(self) -> list[int]:
        return [p[0] for p in self.pending]

    def accept(self, tokens: list[int]) -> None:
        for matcher, token in zip(self.matchers, tokens, strict=True):
            if matcher is None or not matcher.accept_token(token):
                raise AssertionError(f"the grammar refused token {token} of a valid document")

    def advance(self) -> None:
        for i, pending in enumerate(self.pending):
            pending.pop(0)
            matcher = self.matchers[i]
            if not pending:
                assert matcher is not None and matcher.is_terminated()
                self.matchers[i] = self.cache.matcher(self.spec)
                self.pending[i] = list(self.docs[self.started % len(self.docs)]) + [self.stop]
                self.started += 1


def _timed(device: torch.device, fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """(fn(*args), its wall ms), the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) * 1e3


def _sample(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """engine/sampler.py's draw: softmax, then the exponential race argmax(p / E), E ~ Exp(1)."""
    probs = logits.softmax(dim=-1)  # [B, V]
    return (probs / torch.empty_like(probs).exponential_(generator=gen)).argmax(dim=-1)  # [B]


def grammar_step(
    cache: GrammarCompilerCache, docs: list[list[int]], batch: int, device: torch.device, steps: int
):
    """Mean ms per step of fill, apply, accept for `batch` constrained requests; and of softmax + sample."""
    walk = Walk(cache, docs, batch)
    bitmask = allocate_bitmask(batch, cache.vocab_size, pin_memory=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(batch)
    times: dict[str, list[float]] = {"fill": [], "apply": [], "accept": [], "sample": []}
    for step in range(WARMUP + steps):
        logits = torch.randn(batch, cache.vocab_size, device=device, generator=gen)  # [B, V]
        plain = logits.clone()
        rows, t_fill = _timed(device, fill_bitmasks, walk.matchers, bitmask)
        _, t_apply = _timed(device, apply_bitmask, logits, bitmask, rows)
        tokens = walk.next_tokens()
        allowed = logits[torch.arange(batch, device=device), torch.tensor(tokens, device=device)]
        assert bool(torch.isfinite(allowed).all()), "the mask forbade a token of a valid document"
        _, t_accept = _timed(device, walk.accept, tokens)
        _, t_sample = _timed(device, _sample, plain, gen)
        walk.advance()
        if step >= WARMUP:
            for key, ms in zip(times, (t_fill, t_apply, t_accept, t_sample), strict=True):
                times[key].append(ms)
    times["grammar"] = [
        f + a + c for f, a, c in zip(times["fill"], times["apply"], times["accept"], strict=True)
    ]
    return {key: (statistics.fmean(values), statistics.median(values)) for key, values in times.items()}


def engine_step_ms(engine: LLMEngine, batch: int, device: torch.device, steps: int) -> float:
    """Median LLMEngine.step() ms with `batch` requests decoding (32-token prompts)."""
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(temperature=1.0, max_tokens=WARMUP + steps + 8, ignore_eos=True)
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(EngineRequest(rid, torch.randint(4, 8000, (32,), generator=gen).tolist(), params))
    while engine.scheduler.waiting or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running
    ):
        engine.step()
    times = []
    for i in range(WARMUP + steps):
        _, ms = _timed(device, engine.step)
        if i >= WARMUP:
            times.append(ms)
    for rid in ids:
        engine.abort_request(rid)
    engine.step()
    return statistics.median(times)


def compile_cost(vocab: int, stop_ids: tuple[int, ...]) -> dict[str, float]:
    cache = GrammarCompilerCache.from_model_dir(REF_MODEL, vocab, stop_ids)  # empty: a cold compile
    spec = StructuredOutputSpec(json=SCHEMA)
    t0 = time.perf_counter()
    cache.compile(spec)
    t1 = time.perf_counter()
    for _ in range(100):
        cache.matcher(spec)
    t2 = time.perf_counter()
    return {"compile_ms": round((t1 - t0) * 1e3, 3), "matcher_from_cache_us": round((t2 - t1) * 1e4, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--steps", type=int, default=64)
    # one thread by default on the CPU: on a shared 2-core machine torch's 2-thread pool stalls whenever
    # another process holds a core, which times the neighbours, not the work
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-engine", action="store_true", help="skip the reference model's step time")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    load_at_start = round(os.getloadavg()[0], 2)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    dtype = "float32" if device.type == "cpu" else "bfloat16"
    engine = LLMEngine.from_pretrained(
        str(REF_MODEL), device=args.device, dtype=dtype, max_num_seqs=max(args.batches), max_model_len=512,
        num_blocks=1024, enable_prefix_caching=False,
    )  # fmt: skip
    vocab = engine.model_config.vocab_size  # the logits width
    stop_ids = tuple(sorted(engine.eos_token_ids))
    cache = GrammarCompilerCache.from_model_dir(REF_MODEL, vocab, stop_ids)
    tok = engine.tokenizer
    docs = [tok.encode(d, add_special_tokens=False) for d in documents(64)]
    rows = []
    for batch in args.batches:
        means_medians = grammar_step(cache, docs, batch, device, args.steps)
        row: dict[str, float] = {"batch": batch}
        for key, (mean, median) in means_medians.items():
            row |= {f"{key}_ms": round(mean, 4), f"{key}_ms_median": round(median, 4)}
        total, sample = means_medians["grammar"][1], means_medians["sample"][1]
        row |= {
            "grammar_us_per_request": round(total * 1e3 / batch, 2),
            "ratio_to_sample": round(total / sample, 3),
        }
        if not args.no_engine:
            step = engine_step_ms(engine, batch, device, args.steps)
            row |= {"engine_step_ms_median": round(step, 3), "ratio_to_engine_step": round(total / step, 4)}
        rows.append(row)
        print(row, flush=True)
    name = f"structured_output_overhead_{device.type}"
    payload = {
        "model": "models/ridgeline-ref-target (tokenizer, logits width; engine step in " + dtype + ")",
        "vocab_size": vocab,
        "schema": SCHEMA,
        "steps_averaged": args.steps,
        "threads": torch.get_num_threads(),
        "load_average_1m_at_start": load_at_start,  # other work on a shared machine inflates every time here
        "ratios": "median grammar ms (fill + apply + accept) / median ms of the step part compared",
        "mean_tokens_per_document": round(statistics.fmean(len(d) + 1 for d in docs), 1),
        **compile_cost(vocab, stop_ids),
        "rows": rows,
    }
    print(write_result(name, payload, Path(args.out) if args.out else None))


if __name__ == "__main__":
    main()
