"""What requests are sent. Every workload yields `RequestSpec`s from a seed, so a run is reproducible.

- random: prompt and output lengths drawn from distributions (fixed, uniform, normal, lognormal);
- rag: documents reused across requests at a chosen hit ratio (a new question after a shared document),
  the shape of retrieval-augmented traffic that prefix caching serves;
- rag-docs: k documents from a fixed pool in random order, sent in the completions `documents` field
  (Ridgeline's document KV reuse: each document's KV reused at any position), or inlined as one plain prompt
  (document_cache=False: the same text without document caching);
- chat: multi-turn conversations, each turn the whole history plus a new user message (the runner puts each
  answer into the history of the conversation's next turn);
- sharegpt: a ShareGPT-format JSON file (first human turn as the prompt, the reply's length as max_tokens);
- trace: a JSONL file of {"timestamp", "input_length", "output_length"} (the arrival times come from it).

Prompts are text made of common English words (about one token each for BPE tokenizers), so the workload
works against any server's tokenizer; the server's usage reports the exact token counts.
"""

import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

WORKLOADS = ("random", "rag", "rag-docs", "chat", "sharegpt", "trace")
RAG_SYSTEM = "You answer questions using only the documents below.\n"  # rag-docs: the first document
_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "it",
    "this",
    "be",
    "are",
    "or",
    "an",
    "was",
    "which",
    "not",
    "have",
    "has",
    "data",
    "model",
    "system",
    "time",
    "value",
    "result",
    "order",
    "number",
    "point",
    "state",
    "process",
    "service",
    "memory",
    "cache",
    "block",
    "token",
    "request",
    "server",
    "worker",
    "cluster",
    "network",
    "signal",
    "energy",
    "river",
    "mountain",
    "city",
    "market",
    "policy",
    "history",
    "science",
    "music",
    "garden",
    "window",
    "letter",
    "question",
    "answer",
    "reason",
    "method",
    "theory",
]


@dataclass
class RequestSpec:
    prompt: str | None  # completions
    max_tokens: int
    slo_class: str | None = None
    messages: list[dict] | None = None  # chat completions (the chat workload)
    conversation: int | None = None  # chat: which conversation, and which turn of it
    turn: int = 0
    arrival: float | None = None  # trace: seconds from the start
    meta: dict = field(default_factory=dict)
    documents: list[str] | None = None  # completions: document texts before the prompt (rag-docs)


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(max(words, 1)))


class Length:
    """A length distribution: "128", "uniform:64:256", "normal:256:64", "lognormal:256:0.5"."""

    def __init__(self, spec: str | int):
        parts = str(spec).split(":")
        try:
            if len(parts) == 1:
                self.kind, self.args = "fixed", (int(parts[0]),)
            elif parts[0] in ("uniform", "normal", "lognormal") and len(parts) == 3:
                self.kind, self.args = parts[0], (float(parts[1]), float(parts[2]))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"length: got {spec!r}, allowed N, uniform:LO:HI, normal:MEAN:STD, lognormal:MEDIAN:SIGMA"
            ) from None
        if min(self.args) <= 0 and self.kind != "normal" or (self.kind == "normal" and self.args[0] <= 0):
            raise ValueError(f"length: {spec!r} must be positive")

    def draw(self, rng: random.Random) -> int:
        a = self.args
        if self.kind == "fixed":
            value = a[0]
        elif self.kind == "uniform":
            value = rng.uniform(a[0], a[1])
        elif self.kind == "normal":
            value = rng.gauss(a[0], a[1])
        else:
            value = a[0] * rng.lognormvariate(0.0, a[1])
        return max(1, round(value))


def _class(mix: dict[str, float] | None, rng: random.Random) -> str | None:
    if not mix:
        return None
    names, weights = zip(*mix.items(), strict=True)
    return rng.choices(names, weights)[0]


def _indices(n: int | None) -> Iterator[int]:
    return itertools.count() if n is None else iter(range(n))


def random_workload(
    n: int | None, seed: int, input_len: str = "256", output_len: str = "128", slo_mix: dict | None = None
) -> Iterator[RequestSpec]:
    rng, ins, outs = random.Random(seed), Length(input_len), Length(output_len)
    for _ in _indices(n):
        yield RequestSpec(_text(rng, ins.draw(rng)), outs.draw(rng), _class(slo_mix, rng))


def rag_workload(
    n: int | None,
    seed: int,
    doc_len: str = "512",
    question_len: str = "32",
    output_len: str = "64",
    hit_ratio: float = 0.7,
    slo_mix: dict | None = None,
) -> Iterator[RequestSpec]:
    """Each request: a document then a question. With probability `hit_ratio` the document is one already
    used (so its KV can be reused), else a new one."""
    if not 0 <= hit_ratio <= 1:
        raise ValueError(f"hit_ratio: got {hit_ratio}, allowed 0..1")
    rng, docs_len, q_len, outs = (
        random.Random(seed),
        Length(doc_len),
        Length(question_len),
        Length(output_len),
    )
    docs: list[str] = []
    for _ in _indices(n):
        reused = bool(docs) and rng.random() < hit_ratio
        if not reused:
            docs.append(f"Document {len(docs)}: " + _text(rng, docs_len.draw(rng)))
        doc = rng.choice(docs) if reused else docs[-1]
        prompt = f"{doc}\nQuestion: {_text(rng, q_len.draw(rng))}?\nAnswer:"
        yield RequestSpec(prompt, outs.draw(rng), _class(slo_mix, rng), meta={"reused_document": reused})


def rag_docs_workload(
    n: int | None,
    seed: int,
    docs_per_request: int = 4,
    doc_pool: int = 16,
    doc_len: str = "512",
    question_len: str = "32",
    output_len: str = "64",
    document_cache: bool = True,
    slo_mix: dict | None = None,
) -> Iterator[RequestSpec]:
    """Each request: the system line (a fixed first document), `docs_per_request` documents drawn without
    replacement from a pool of `doc_pool` (made once from the seed) in random order, then a question. With
    `document_cache` they go in the `documents` field and the prompt is the question; without, the same text
    is one plain prompt (documents concatenated, then the question). Both draw the same requests per seed."""
    if doc_pool < 1:
        raise ValueError(f"doc_pool: got {doc_pool}, allowed >= 1")
    if not 1 <= docs_per_request <= doc_pool:
        raise ValueError(f"docs_per_request: got {docs_per_request}, allowed 1..doc_pool ({doc_pool})")
    rng, docs_len, q_len, outs = (
        random.Random(seed),
        Length(doc_len),
        Length(question_len),
        Length(output_len),
    )
    pool = [f"Document {i}: {_text(rng, docs_len.draw(rng))}\n" for i in range(doc_pool)]
    for _ in _indices(n):
        picked = rng.sample(range(doc_pool), docs_per_request)  # without replacement, in random order
        docs = [RAG_SYSTEM] + [pool[i] for i in picked]
        question = f"Question: {_text(rng, q_len.draw(rng))}?\nAnswer:"
        max_tokens, cls = outs.draw(rng), _class(slo_mix, rng)
        meta = {"documents": picked}
        if document_cache:
            yield RequestSpec(question, max_tokens, cls, meta=meta, documents=docs)
        else:
            yield RequestSpec("".join(docs) + question, max_tokens, cls, meta=meta)


def chat_workload(
    n: int | None,
    seed: int,
    turns: int = 4,
    user_len: str = "48",
    output_len: str = "48",
    system_len: int = 64,
    slo_mix: dict | None = None,
) -> Iterator[RequestSpec]:
    """n requests as ceil(n / turns) conversations of `turns` turns; a turn's messages are completed with the
    earlier answers by the runner (RequestSpec.messages holds the system prompt and this turn's user text)."""
    if turns < 1:
        raise ValueError(f"turns: got {turns}, allowed >= 1")
    rng, users, outs = random.Random(seed), Length(user_len), Length(output_len)
    cls = None
    for i in _indices(n):
        conversation, turn = divmod(i, turns)
        if turn == 0:
            cls = _class(slo_mix, rng)  # one class per conversation
        system = {"role": "system", "content": f"Conversation {conversation}. " + _text(rng, system_len)}
        user = {"role": "user", "content": _text(rng, users.draw(rng))}
        yield RequestSpec(
            None,
            outs.draw(rng),
            cls,
            messages=[system, user] if turn == 0 else [user],
            conversation=conversation,
            turn=turn,
        )


def sharegpt_workload(
    path: str, n: int | None, seed: int, slo_mix: dict | None = None, max_output: int = 1024
) -> Iterator[RequestSpec]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"dataset: {path} is not a ShareGPT list of conversations")
    pairs = []
    for item in data:
        turns = item.get("conversations") or item.get("conversation") or []
        for a, b in zip(turns, turns[1:], strict=False):
            if a.get("from") in ("human", "user") and b.get("from") in ("gpt", "assistant"):
                pairs.append((a["value"], min(max(len(b["value"].split()), 1), max_output)))
                break
    if not pairs:
        raise ValueError(f"dataset: {path} has no human/gpt turn pair")
    rng = random.Random(seed)
    for _ in _indices(n):
        yield RequestSpec(*rng.choice(pairs), _class(slo_mix, rng))


def trace_workload(
    path: str, seed: int, slo_mix: dict | None = None, n: int | None = None
) -> Iterator[RequestSpec]:
    rows = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append((float(row["timestamp"]), int(row["input_length"]), int(row["output_length"])))
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f"trace: {path}:{lineno}: want {{timestamp, input_length, output_length}}"
            ) from None
    if not rows:
        raise ValueError(f"trace: {path} is empty")
    rows.sort()
    rows = rows[:n] if n else rows
    rng = random.Random(seed)
    t0 = rows[0][0]
    for t, i, o in rows:
        yield RequestSpec(_text(rng, i), o, _class(slo_mix, rng), arrival=t - t0)
