"""Train the reference model pair here: a Llama-architecture target (15.7M parameters) and draft (2.5M)
sharing one byte-level BPE tokenizer, on text every machine with Python has — the standard library's source.
Files are split by a hash of their path (1 in 20 held out, 1 in 20 validation); everything is seeded.

    python -m benchmarks.train_reference --out models                 # on the H200: minutes
    python -m benchmarks.train_reference --out /tmp/ref --smoke       # on a CPU: seconds, tiny everything

Writes <out>/ridgeline-ref-target and <out>/ridgeline-ref-draft in HF format (config.json, safetensors shards
of at most 16 MB, tokenizer.json, tokenizer_config.json with a chat template, generation_config.json) and
<out>/model_card.json with the data, step budgets, losses, held-out perplexities and draft/target agreement.
"""

import argparse
import hashlib
import json
import math
import sysconfig
import time
from pathlib import Path

import torch

from benchmarks.results_io import git_commit
from engine.tiny_model import CHATML, SPECIAL_TOKENS

TARGET = dict(
    hidden_size=384,
    intermediate_size=1024,
    num_hidden_layers=6,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=64,
)
DRAFT = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
)
SMOKE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
)


def split_of(rel_path: str) -> str:
    """held-out (1 file in 20), validation (1 in 20: picks checkpoints) or train, by a hash of the path, so a
    file keeps its split across Python versions."""
    bucket = int(hashlib.sha256(rel_path.encode()).hexdigest(), 16) % 20
    return {0: "heldout", 1: "valid"}.get(bucket, "train")


def corpus(limit_bytes: int | None = None) -> dict[str, list[str]]:
    """{train, valid, heldout: texts}: the stdlib's .py files, sorted, split by split_of."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: dict[str, list[str]] = {"train": [], "valid": [], "heldout": []}
    total = 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts[split_of(str(path.relative_to(root)))].append(text)
        total += len(text)
        if limit_bytes and total >= limit_bytes:
            break
    for name in ("heldout", "valid"):  # a small (smoke) corpus still evaluates on something
        while sum(map(len, parts[name])) < 20_000 and len(parts["train"]) > 1:
            parts[name].append(parts["train"].pop())
    return parts


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    return tok


def token_stream(tok, texts: list[str]) -> torch.Tensor:
    """All texts as one int64 stream, each file ended by </s> (id 1)."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(1)
    return torch.tensor(ids, dtype=torch.int64)


def build(spec: dict, vocab: int, seed: int, max_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        max_position_embeddings=max_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        **spec,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _bf16(device: str) -> bool:
    """bf16 autocast: on GPUs, and on CPUs with native bf16 matmuls (AVX512-BF16/AMX: 2.5x fp32 here)."""
    return device == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def batches(stream: torch.Tensor, seq: int, batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=gen)
        yield torch.stack([stream[s : s + seq + 1] for s in starts.tolist()])


def train(
    model,
    stream: torch.Tensor,
    steps: int,
    seq: int,
    batch: int,
    lr: float,
    device: str,
    seed: int,
    valid: torch.Tensor | None = None,
) -> tuple[list, float]:
    """AdamW with warm-up and cosine decay over `steps`; with `valid`, the weights of the best validation
    perplexity (checked 20 times) are kept: a 16M model overfits the stdlib's few million tokens within a few
    epochs. Returns (log of [step, loss, valid ppl], the best valid ppl)."""
    model.to(device).train()
    best = (math.inf, None)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    )
    log, start = [], time.perf_counter()
    for step, chunk in zip(range(steps), batches(stream, seq, batch, seed), strict=False):
        chunk = chunk.to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=_bf16(device)):
            loss = model(input_ids=chunk[:, :-1], labels=chunk[:, :-1]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % max(steps // 20, 1) == 0 or step == steps - 1:
            entry = [step, round(loss.item(), 4)]
            if valid is not None:
                ppl = evaluate(model, valid, seq, device, max_tokens=100_000 if device == "cuda" else 50_000)
                model.train()
                entry.append(round(ppl, 3))
                if ppl < best[0]:
                    best = (ppl, {k: v.detach().clone() for k, v in model.state_dict().items()})
            log.append(entry)
            print(
                f"step {step} loss {loss.item():.3f}"
                + (f" valid ppl {entry[2]:.2f}" if valid is not None else "")
                + f" ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    if best[1] is not None:
        model.load_state_dict(best[1])
    return log, best[0]


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq: int, device: str, max_tokens: int) -> float:
    """Held-out perplexity over consecutive windows (up to max_tokens tokens)."""
    model.eval()
    n = min(len(stream) - 1, max_tokens) // seq * seq
    x = stream[: n + 1]
    total, count = 0.0, 0
    for s in range(0, n, seq * 16):
        rows = torch.stack([x[i : i + seq + 1] for i in range(s, min(s + seq * 16, n), seq)]).to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=_bf16(device)):
            logits = model(input_ids=rows[:, :-1]).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum"
        )
        total, count = total + nll.item(), count + rows[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def agreement(target, draft, stream: torch.Tensor, seq: int, device: str, max_tokens: int) -> float:
    """How often the draft's greedy next token equals the target's on held-out text."""
    n = min(len(stream) - 1, max_tokens) // seq * seq
    rows = stream[:n].reshape(-1, seq)[:64].to(device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=_bf16(device)):
        a = target(input_ids=rows).logits.argmax(-1)
        b = draft(input_ids=rows).logits.argmax(-1)
    return (a == b).float().mean().item()


def save(model, tok, out: Path, max_len: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu", dtype=torch.bfloat16).save_pretrained(out, max_shard_size="16MB", safe_serialization=True)
    model.generation_config.eos_token_id = [1, 3]
    model.generation_config.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "chat_template": CHATML,
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": max_len,
            },
            indent=2,
        )
        + "\n"
    )


def model_card_markdown(card: dict) -> str:
    """The model card as a README beside the checkpoints (the numbers come from model_card.json)."""
    rows = []
    for name, m in card["models"].items():
        c = m["config"]
        shape = (
            f"{c['num_hidden_layers']} layers, hidden {c['hidden_size']}, MLP {c['intermediate_size']}, "
            f"{c['num_attention_heads']} heads / {c['num_key_value_heads']} KV heads of {c['head_dim']}"
        )
        valid = {steps: run["best_valid_perplexity"] for steps, run in m["runs"].items()}
        rows.append(
            f"| `ridgeline-ref-{name}` | {m['parameters'] / 1e6:.2f}M | {shape} | {m['chosen_steps']} "
            f"(valid ppl by budget: {valid}) | {m['heldout_perplexity']} |"
        )
    return f"""# Ridgeline reference models

A Llama-architecture target and draft trained here with one byte-level BPE tokenizer
(vocabulary {card["vocab_size"]}, ChatML special tokens) on {card["data"]}.
Python {card["python"]}'s standard library: {card["train_tokens"]:,} training tokens, {card["valid_tokens"]:,}
validation, {card["heldout_tokens"]:,} held out. Context {card["seq_len"]} tokens in training (the checkpoints
declare 1024), batch {card["batch"]}, AdamW (betas 0.9/0.95, weight decay 0.1), warm-up then cosine decay,
seed {card["seed"]}, trained on {card["device"]} at commit {card["commit"]}. Weights are bf16 safetensors.

| model | parameters | shape | steps chosen | held-out perplexity |
|---|---|---|---|---|
{chr(10).join(rows)}

A uniform model's perplexity is {card["uniform_perplexity"]}. The draft's greedy next token equals the
target's on {card["greedy_agreement_draft_vs_target"]:.1%} of held-out positions (teacher-forced).

Reproduce: `{card["command"]}` (the loss and validation curves are in `model_card.json`).
They write Python-flavoured text; they are a yardstick for speculative decoding, quantization and
uncertainty work, not an assistant. The training text is the Python standard library (PSF License).
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny data, models and steps (CPU, seconds)")
    parser.add_argument(
        "--steps",
        default=None,
        help="step budgets, comma-separated: each model is trained once per budget (cosine "
        "schedule over it) and the best on the validation files is kept",
    )
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if there is one)")
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    commit = git_commit()  # now: the tree may move while this trains
    budgets = [int(b) for b in (args.steps or ("20" if args.smoke else "800,1500,3000")).split(",")]
    vocab = args.vocab or (512 if args.smoke else 8192)
    seq, batch = (64, 8) if args.smoke else (args.seq, args.batch)
    t0 = time.perf_counter()
    texts = corpus(limit_bytes=400_000 if args.smoke else None)
    tok = train_tokenizer(texts["train"], vocab)
    ids = {name: token_stream(tok, part) for name, part in texts.items()}
    print(
        "corpus: "
        + ", ".join(f"{n} {len(texts[n])} files {len(ids[n])} tokens" for n in ids)
        + f"; tokenizer in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    max_len = 1024
    card = {
        "commit": commit,
        "data": "the Python standard library's .py files (sorted; by a hash of the path 1 in 20 held out, 1 in "
        "20 validation, which picks each model's step budget and checkpoint, the rest train)",
        "python": sysconfig.get_python_version(),
        "train_tokens": len(ids["train"]),
        "valid_tokens": len(ids["valid"]),
        "heldout_tokens": len(ids["heldout"]),
        "vocab_size": tok.get_vocab_size(),
        "step_budgets": budgets,
        "seq_len": seq,
        "batch": batch,
        "seed": args.seed,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "uniform_perplexity": tok.get_vocab_size(),
        "models": {},
    }
    models = {}
    scale = 1.0 if args.smoke else math.sqrt(batch / 64)  # the learning rates were tuned at batch 64
    for name, spec, lr in (
        ("target", SMOKE if args.smoke else TARGET, 2e-3 * scale),
        ("draft", SMOKE if args.smoke else DRAFT, 3e-3 * scale),
    ):
        runs, best = {}, None
        for steps in budgets:
            model = build(spec, tok.get_vocab_size(), args.seed, max_len)
            start = time.perf_counter()
            log, valid_ppl = train(
                model, ids["train"], steps, seq, batch, lr, device, args.seed, valid=ids["valid"]
            )
            runs[steps] = {
                "best_valid_perplexity": round(valid_ppl, 3),
                "log_step_loss_validppl": log,
                "train_seconds": round(time.perf_counter() - start, 1),
            }
            print(f"{name} {steps} steps: best valid perplexity {valid_ppl:.2f}", flush=True)
            if best is None or valid_ppl < best[0]:
                best = (valid_ppl, steps, model)
        _, steps, model = best
        params = sum(p.numel() for p in model.parameters())
        ppl = evaluate(model, ids["heldout"], seq, device, max_tokens=200_000)
        card["models"][name] = {
            "parameters": params,
            "config": spec,
            "lr": lr,
            "chosen_steps": steps,
            "heldout_perplexity": round(ppl, 3),
            "runs": runs,
        }
        print(
            f"{name}: {params / 1e6:.2f}M parameters, {steps} steps, held-out perplexity {ppl:.2f}",
            flush=True,
        )
        models[name] = model
    card["greedy_agreement_draft_vs_target"] = round(
        agreement(models["target"], models["draft"], ids["heldout"], seq, device, 200_000), 4
    )
    out = Path(args.out)
    for name, model in models.items():
        save(model, tok, out / f"ridgeline-ref-{name}", max_len)
    command = (
        "python -m benchmarks.train_reference --out "
        + str(out)
        + (
            " --smoke"
            if args.smoke
            else f" --steps {','.join(map(str, budgets))} --batch {batch} --device {device}"
        )
    )
    card["command"] = command
    (out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "README.md").write_text(model_card_markdown(card))
    print(json.dumps({k: v for k, v in card.items() if k != "models"}, indent=2))


if __name__ == "__main__":
    main()
