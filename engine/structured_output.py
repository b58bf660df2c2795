"""Structured outputs: a grammar (JSON schema, any JSON object, regex, choice, EBNF) constrains sampling
through a token bitmask, as in vLLM's structured-output manager, with xgrammar as the grammar engine.

A `StructuredOutputSpec` is plain data checked at construction (no tokenizer needed). The decode worker's
`GrammarCompilerCache` compiles it against the tokenizer and the logits width (LRU by spec) into a
per-request `GrammarMatcher`. Each step the matchers fill their rows of a CPU int32 bitmask
([rows, ceil(V / 32)], bit j of a row = token j allowed) and `apply_bitmask` sets the disallowed logits to
-inf on the logits' device. A verifier of k drafted tokens fills k + 1 rows per request with
`fill_draft_bitmasks`, one per scored position, and learns how many drafts the grammar accepts in order.
"""

from __future__ import annotations

import importlib
import json as jsonlib
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer as HFTokenizer

from engine.errors import ParameterError

if TYPE_CHECKING:
    import xgrammar as xgr
else:

    class _OnFirstUse:
        """A module imported when first used: xgrammar pulls in transformers (about 1.3 s a process), and most
        processes never constrain a request."""

        def __init__(self, name: str):
            self._name, self._module = name, None

        def __getattr__(self, attr: str):
            if self._module is None:
                self._module = importlib.import_module(self._name)
            return getattr(self._module, attr)

    xgr = _OnFirstUse("xgrammar")

KINDS = ("json", "json_object", "regex", "choice", "grammar")
_ANY_OBJECT_SCHEMA = '{"type": "object"}'
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# xgrammar's C++ errors read "[12:00:00] /project/cpp/file.cc:42: Check failed: (...) is false: detail"
_LIBRARY_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")
# xgrammar 0.2.x lets a JSON string with minLength/maxLength hold raw control characters, which JSON forbids
# (json.loads refuses them; mlc-ai/xgrammar#800): that character class is swapped for JSON's
_BOUNDED_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\]"


def _library_message(error: Exception) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return _LIBRARY_PREFIX.sub("", lines[0] if lines else type(error).__name__)


@dataclass(frozen=True)
class StructuredOutputSpec:
    """What one request's output must match: exactly one of `json` (a JSON schema, dict or JSON text),
    `json_object` (any JSON object), `regex`, `choice` (one of these strings) or `grammar` (EBNF in
    xgrammar's GBNF dialect, `root ::= ...`). For json: `whitespace_flexible` allows any whitespace
    between JSON tokens (False: one space after `,` and `:`, none elsewhere); `strict` (OpenAI's
    `json_schema.strict`) forbids properties and items the schema does not list.

    Construction checks the spec with xgrammar (no tokenizer needed), so a spec that exists compiles; bad
    input raises ParameterError naming `param`, the request field it came from (HTTP 400). It holds only
    str / tuple / bool: hashable (the compile cache's key, `param` left out) and picklable (it travels
    inside SamplingParams)."""

    json: str | dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: Sequence[str] | None = None  # kept as a tuple
    grammar: str | None = None
    whitespace_flexible: bool = True
    strict: bool = True
    param: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        given = [name for name in KINDS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ParameterError(self.param or "structured_outputs", f"exactly one of {KINDS}; got {given}")
        if self.json is not None:
            object.__setattr__(self, "json", self._schema_text(self.json))
        if self.choice is not None:
            choices = self.choice
            if isinstance(choices, str) or not choices or any(not isinstance(c, str) for c in choices):
                raise ParameterError(self.field_name, "a non-empty list of strings")
            object.__setattr__(self, "choice", tuple(choices))
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ParameterError(self.field_name, f"a string; got {type(getattr(self, name)).__name__}")
        if not isinstance(self.json_object, bool):
            raise ParameterError(self.field_name, "true or false")
        try:
            self.to_grammar()
        except (RuntimeError, ValueError) as e:
            raise ParameterError(self.field_name, f"cannot be compiled: {_library_message(e)}") from e

    @property
    def kind(self) -> str:
        return next(name for name in KINDS if getattr(self, name) not in (None, False))

    @property
    def field_name(self) -> str:
        """The request field errors name: `param` when given, else `structured_outputs.<kind>`."""
        return self.param or f"structured_outputs.{self.kind}"

    def _schema_text(self, schema: str | dict[str, Any]) -> str:
        if isinstance(schema, str):
            try:
                schema = jsonlib.loads(schema)
            except ValueError as e:
                raise ParameterError(self.field_name, f"not valid JSON: {e}") from e
        if not isinstance(schema, dict):
            raise ParameterError(self.field_name, f"a JSON schema object; got {type(schema).__name__}")
        try:  # one text per schema (whatever spacing it came in), so equal schemas share a cache entry
            return jsonlib.dumps(schema, ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise ParameterError(self.field_name, f"not JSON-serializable: {e}") from e

    def to_grammar(self) -> xgr.Grammar:
        """The tokenizer-independent grammar; raises xgrammar's RuntimeError on input it cannot take."""
        if self.json is not None or self.json_object:
            schema = self.json if isinstance(self.json, str) else _ANY_OBJECT_SCHEMA
            grammar = xgr.Grammar.from_json_schema(
                schema,
                any_whitespace=self.whitespace_flexible,
                strict_mode=self.strict and not self.json_object,
            )
            text = str(grammar)
            if _BOUNDED_STRING_CHAR not in text:
                return grammar
            return xgr.Grammar.from_ebnf(text.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR))
        if self.regex is not None:
            return xgr.Grammar.from_regex(self.regex)
        if self.choice is not None:  # a JSON string literal is a valid GBNF literal (same escapes)
            alternatives = " | ".join(jsonlib.dumps(c, ensure_ascii=False) for c in self.choice)
            return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
        assert self.grammar is not None
        return xgr.Grammar.from_ebnf(self.grammar)


def _vocab_type(tokenizer: HFTokenizer) -> tuple[xgr.VocabType, bool]:
    """(how vocabulary entries spell bytes, whether the tokenizer prepends a space), from its decoder."""
    decoder = jsonlib.loads(tokenizer.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = {part.get("type") for part in parts}
    if "ByteLevel" in types:  # GPT-2 style: "Ġ" for a space, every byte one printable character
        return xgr.VocabType.BYTE_LEVEL, False
    if "ByteFallback" in types:  # SentencePiece style: "▁" for a space, "<0x0A>" for a raw byte
        strips_prefix = any(p.get("type") == "Strip" and p.get("start", 0) > 0 for p in parts)
        return xgr.VocabType.BYTE_FALLBACK, strips_prefix
    return xgr.VocabType.RAW, False


def tokenizer_info(
    tokenizer: HFTokenizer, vocab_size: int, stop_token_ids: Sequence[int]
) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary, `vocab_size` (the logits width) ids long: ids past the tokenizer's
    (padding) and special added tokens are never allowed; only `stop_token_ids` may end the output."""
    encoded = [""] * vocab_size
    for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
        if token_id < vocab_size:
            encoded[token_id] = token
    for token_id, added in tokenizer.get_added_tokens_decoder().items():
        if added.special and token_id < vocab_size:  # "<s>" is a control token, not the text "<s>"
            encoded[token_id] = ""
    vocab_type, add_prefix_space = _vocab_type(tokenizer)
    return xgr.TokenizerInfo(
        encoded,
        vocab_type,
        vocab_size=vocab_size,
        stop_token_ids=list(stop_token_ids),
        add_prefix_space=add_prefix_space,
    )


class GrammarMatcher:
    """One request's position in its grammar: which tokens may come next, and the tokens taken so far.
    Not thread-safe: one thread (the scheduler's) drives a request's matcher at a time."""

    def __init__(self, compiled: xgr.CompiledGrammar):
        self._matcher = xgr.GrammarMatcher(compiled)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Writes the allowed next tokens into `bitmask[row]` (CPU int32). Once terminated, nothing is
        constrained (all allowed): the request has ended at its stop token."""
        if self._matcher.is_terminated():
            bitmask[row].fill_(-1)
        else:
            self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept_token(self, token: int) -> bool:
        """Advances past `token` if the grammar allows it; False (state unchanged) if not, or if terminated."""
        return not self._matcher.is_terminated() and self._matcher.accept_token(token)

    def accept_tokens(self, tokens: Iterable[int]) -> int:
        """Accepts tokens in order up to the first the grammar refuses; returns how many it accepted."""
        accepted = 0
        for token in tokens:
            if not self.accept_token(token):
                break
            accepted += 1
        return accepted

    def rollback(self, num_tokens: int) -> None:
        """Undoes the last `num_tokens` accepted tokens (at most as many as were accepted)."""
        if num_tokens:
            self._matcher.rollback(num_tokens)

    def is_terminated(self) -> bool:
        """True once a stop token was accepted: the output is complete."""
        return self._matcher.is_terminated()

    def eos_allowed(self) -> bool:
        """True when the text so far is complete, so a stop token (EOS) is allowed next."""
        return not self._matcher.is_terminated() and self._matcher.is_completed()

    def fill_draft_bitmasks(self, draft: Sequence[int], bitmask: torch.Tensor, first_row: int) -> int:
        """For a verifier that scores k + 1 positions (k = len(draft)): fills bitmask rows first_row + i,
        i = 0..k, with the tokens allowed after draft[:i], and returns how many drafts the grammar accepts
        in order (n). Rows past n + 1 allow everything (the verifier rejects draft n there anyway). The
        matcher's state is unchanged: accept the tokens the verifier keeps afterwards."""
        num_valid = 0
        for i in range(len(draft) + 1):
            self.fill_bitmask(bitmask, first_row + i)
            if i == len(draft) or not self.accept_token(draft[i]):
                break
            num_valid += 1
        bitmask[first_row + num_valid + 1 : first_row + len(draft) + 1] = -1
        self.rollback(num_valid)
        return num_valid


class GrammarCompilerCache:
    """Compiles specs against one tokenizer and logits width (`vocab_size`, which may exceed the
    tokenizer's vocabulary: padding ids are always masked) and keeps the last `capacity` compiled grammars,
    keyed by spec. Thread-safe. A compile takes milliseconds for typical schemas; a matcher from a cached
    grammar costs microseconds."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        capacity: int = 256,
        compile_threads: int = 2,
    ):
        stop_ids = sorted(set(stop_token_ids))
        if not stop_ids or any(not 0 <= t < vocab_size for t in stop_ids):
            raise ValueError(f"stop_token_ids: non-empty ids in [0, {vocab_size}); got {stop_ids}")
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(stop_ids)
        self.capacity = capacity
        info = tokenizer_info(tokenizer, vocab_size, stop_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=compile_threads, cache_enabled=False)
        self._compiled: OrderedDict[StructuredOutputSpec, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path, vocab_size: int, stop_token_ids: Iterable[int], **kwargs: Any
    ) -> GrammarCompilerCache:
        path = Path(model_dir) / "tokenizer.json"
        if not path.exists():
            raise ParameterError("model", f"{model_dir} has no tokenizer.json")
        return cls(HFTokenizer.from_file(str(path)), vocab_size, stop_token_ids, **kwargs)

    def compile(self, spec: StructuredOutputSpec) -> xgr.CompiledGrammar:
        with self._lock:
            if (hit := self._compiled.get(spec)) is not None:
                self._compiled.move_to_end(spec)
                return hit
        try:  # outside the lock: compiles of other specs run meanwhile
            compiled = self._compiler.compile_grammar(spec.to_grammar())
        except (RuntimeError, ValueError) as e:
            raise ParameterError(spec.field_name, f"cannot be compiled: {_library_message(e)}") from e
        with self._lock:
            self._compiled[spec] = compiled
            while len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
        return compiled

    def matcher(self, spec: StructuredOutputSpec) -> GrammarMatcher:
        return GrammarMatcher(self.compile(spec))

    def __len__(self) -> int:
        return len(self._compiled)


@dataclass(frozen=True)
class DraftBitmasks:
    """What `fill_draft_bitmasks` filled: the constrained rows (others are untouched) and, per request,
    how many of its drafts the grammar accepts in order (all of them for an unconstrained request)."""

    rows: list[int]
    num_valid: list[int]


def allocate_bitmask(num_rows: int, vocab_size: int, pin_memory: bool = False) -> torch.Tensor:
    """A CPU int32 bitmask [num_rows, ceil(vocab_size / 32)], all allowed. Pinned memory makes the copy to
    the GPU asynchronous."""
    bitmask = xgr.allocate_token_bitmask(num_rows, vocab_size)
    return bitmask.pin_memory() if pin_memory else bitmask


def fill_bitmasks(matchers: Sequence[GrammarMatcher | None], bitmask: torch.Tensor) -> list[int]:
    """Row i of the batch gets matchers[i]'s allowed tokens; None is an unconstrained request, whose row is
    left as it is. Returns the filled rows, for `apply_bitmask`."""
    rows = []
    for row, matcher in enumerate(matchers):
        if matcher is not None:
            matcher.fill_bitmask(bitmask, row)
            rows.append(row)
    return rows


def fill_draft_bitmasks(
    matchers: Sequence[GrammarMatcher | None], drafts: Sequence[Sequence[int]], bitmask: torch.Tensor
) -> DraftBitmasks:
    """For a verifier whose logits hold len(drafts[i]) + 1 consecutive rows for request i, in batch order:
    fills each constrained request's rows (see GrammarMatcher.fill_draft_bitmasks)."""
    rows: list[int] = []
    num_valid = []
    first_row = 0
    for matcher, draft in zip(matchers, drafts, strict=True):
        if matcher is None:
            num_valid.append(len(draft))
        else:
            num_valid.append(matcher.fill_draft_bitmasks(draft, bitmask, first_row))
            rows.extend(range(first_row, first_row + len(draft) + 1))
        first_row += len(draft) + 1
    return DraftBitmasks(rows, num_valid)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """In place: logits[r, j] = -inf where bit j of bitmask[r] is 0, for r in rows; other rows untouched.
    logits [N, V] on the CPU or a GPU; bitmask [>= N, >= ceil(V / 32)] int32 on the CPU, copied over
    asynchronously when pinned: refill it only after the step's results are read back (which syncs).
    xgrammar's kernel (CPU, Triton on CUDA) for float32/16 and bfloat16, else `apply_bitmask_torch`."""
    if not rows:
        return
    num_rows, vocab = logits.shape  # [N, V]
    if bitmask.dtype != torch.int32 or bitmask.shape[0] < num_rows or bitmask.shape[1] * 32 < vocab:
        raise ValueError(
            f"bitmask {tuple(bitmask.shape)} {bitmask.dtype} does not cover logits {(num_rows, vocab)}"
        )
    if bitmask.device != logits.device:
        bitmask = bitmask[:num_rows].to(logits.device, non_blocking=True)
    if logits.dtype in _KERNEL_DTYPES and logits.device.type in ("cpu", "cuda") and logits.stride(1) == 1:
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=list(rows))
    else:
        apply_bitmask_torch(logits, bitmask, rows)


def apply_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """The vectorized torch path of `apply_bitmask` (any device and float dtype): unpack the bits of the
    chosen rows into a bool mask and fill -inf where a bit is 0."""
    vocab = logits.shape[1]
    index = torch.as_tensor(list(rows), dtype=torch.long, device=logits.device)
    words = bitmask.to(logits.device)[index]  # [R, W] int32
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :vocab].bool()  # [R, W, 32] -> [R, V]
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
