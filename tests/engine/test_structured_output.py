"""Structured outputs: specs are checked at construction, the grammar's bitmask allows exactly the tokens
that keep the text valid, walks that sample only allowed tokens end in valid text, rollback and drafts."""

import json
import pickle
import re
from pathlib import Path

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers

from engine.errors import ParameterError
from engine.structured_output import (
    GrammarCompilerCache,
    GrammarMatcher,
    StructuredOutputSpec,
    allocate_bitmask,
    apply_bitmask,
    apply_bitmask_torch,
    fill_bitmasks,
    fill_draft_bitmasks,
)
from engine.tiny_model import train_tokenizer

REF_MODEL = Path(__file__).resolve().parents[2] / "models" / "ridgeline-ref-target"
STOP_IDS = (1, 3)  # </s> and <|im_end|> in the reference and the tiny tokenizers
PADDING = 37  # logits wider than the tokenizer's vocabulary, not a multiple of 32
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number"},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "kind", "tags", "active"],
}
CHOICES = ["yes", "no", 'say "maybe"', "back\\slash", "héllo ✓"]
ARITHMETIC = """
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= [1-9] [0-9]? | "(" expr ")"
"""
ARITHMETIC_RE = re.compile(r"[0-9+\-*/()]+")


@pytest.fixture(scope="module", params=["reference", "tiny"])
def tokenizer(request) -> Tokenizer:
    if request.param == "reference":
        return Tokenizer.from_file(str(REF_MODEL / "tokenizer.json"))
    return train_tokenizer()


@pytest.fixture(scope="module")
def cache(tokenizer) -> GrammarCompilerCache:
    return GrammarCompilerCache(tokenizer, tokenizer.get_vocab_size() + PADDING, STOP_IDS)


def _walk(
    cache: GrammarCompilerCache, matcher: GrammarMatcher, seed: int, max_steps: int = 3000
) -> list[int]:
    """Samples from random logits masked by the grammar until it terminates; stop tokens get a bonus, so a
    walk ends soon after the text may end. Returns the tokens before the stop token."""
    gen = torch.Generator().manual_seed(seed)
    bitmask = allocate_bitmask(1, cache.vocab_size)
    tokens: list[int] = []
    for _ in range(max_steps):
        matcher.fill_bitmask(bitmask, 0)
        stop = cache.stop_token_ids[0]
        assert matcher.eos_allowed() == bool((int(bitmask[0, stop // 32]) >> (stop % 32)) & 1)
        logits = torch.randn(1, cache.vocab_size, generator=gen) * 3  # [1, V]
        logits[0, list(cache.stop_token_ids)] += 6.0
        apply_bitmask(logits, bitmask, [0])
        token = int(torch.multinomial(torch.softmax(logits[0], -1), 1, generator=gen))
        assert matcher.accept_token(token), f"the mask allowed token {token}, which the grammar refused"
        if matcher.is_terminated():
            assert token in cache.stop_token_ids
            return tokens
        tokens.append(token)
    raise AssertionError(f"no stop token in {max_steps} steps")


def _allowed(bitmask: torch.Tensor, row: int, vocab_size: int) -> list[bool]:
    """Bit j of the row, by an explicit loop (the test oracle)."""
    words = bitmask[row].tolist()
    return [bool((words[j // 32] >> (j % 32)) & 1) for j in range(vocab_size)]


def _text(tokenizer: Tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=False)


@pytest.mark.parametrize("flexible", [True, False])
def test_json_schema_walks_produce_valid_documents(tokenizer, cache, flexible):
    spec = StructuredOutputSpec(json=SCHEMA, whitespace_flexible=flexible)
    for seed in range(4):
        text = _text(tokenizer, _walk(cache, cache.matcher(spec), seed))
        jsonschema.validate(json.loads(text), SCHEMA)
        assert set(json.loads(text)) <= set(SCHEMA["properties"])  # strict: no other keys
        if not flexible:
            assert "\n" not in text and "  " not in text


def test_json_object_walks_produce_objects(tokenizer, cache):
    for seed in range(4):
        text = _text(tokenizer, _walk(cache, cache.matcher(StructuredOutputSpec(json_object=True)), seed))
        assert isinstance(json.loads(text), dict)


def test_regex_walks_fullmatch(tokenizer, cache):
    pattern = r"(\d{3}-[a-z]{2,5}|[A-Z][a-z]+ \d+)"
    for seed in range(6):
        text = _text(tokenizer, _walk(cache, cache.matcher(StructuredOutputSpec(regex=pattern)), seed))
        assert re.fullmatch(pattern, text), text


def test_choice_walks_end_on_one_choice(tokenizer, cache):
    seen = set()
    for seed in range(12):
        text = _text(tokenizer, _walk(cache, cache.matcher(StructuredOutputSpec(choice=CHOICES)), seed))
        assert text in CHOICES
        seen.add(text)
    assert len(seen) > 1


def test_ebnf_grammar_walks_parse(tokenizer, cache):
    for seed in range(6):
        text = _text(tokenizer, _walk(cache, cache.matcher(StructuredOutputSpec(grammar=ARITHMETIC)), seed))
        assert ARITHMETIC_RE.fullmatch(text) and text.count("(") == text.count(")"), text
        eval(compile(text, "<grammar>", "eval"), {"__builtins__": {}})  # a well-formed expression


def test_mask_allows_exactly_the_tokens_the_grammar_accepts(tokenizer, cache):
    matcher = cache.matcher(StructuredOutputSpec(json=SCHEMA, whitespace_flexible=False))
    assert matcher.accept_tokens(tokenizer.encode('{"name": "Al', add_special_tokens=False).ids) > 0
    bitmask = allocate_bitmask(1, cache.vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    allowed = _allowed(bitmask, 0, cache.vocab_size)
    for token in range(cache.vocab_size):
        accepted = matcher.accept_token(token)
        assert accepted == allowed[token], (token, tokenizer.id_to_token(token))
        matcher.rollback(int(accepted))


def test_mask_forbids_tokens_that_break_the_grammar(tokenizer, cache):
    matcher = cache.matcher(StructuredOutputSpec(regex=r"\d{3}"))
    bitmask = allocate_bitmask(1, cache.vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    allowed = _allowed(bitmask, 0, cache.vocab_size)
    digit, letter = tokenizer.token_to_id("7"), tokenizer.token_to_id("a")
    assert allowed[digit] and not allowed[letter]
    assert not any(allowed[t] for t in STOP_IDS) and not matcher.eos_allowed()
    assert not matcher.accept_token(letter)
    assert matcher.accept_tokens([digit, digit, digit]) == 3
    matcher.fill_bitmask(bitmask, 0)
    allowed = _allowed(bitmask, 0, cache.vocab_size)
    assert [t for t, ok in enumerate(allowed) if ok] == list(STOP_IDS) and matcher.eos_allowed()


def test_special_and_padding_ids_are_never_allowed(tokenizer, cache):
    matcher = cache.matcher(StructuredOutputSpec(regex=r"[^\n]{0,40}"))  # almost any text
    bitmask = allocate_bitmask(1, cache.vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    allowed = _allowed(bitmask, 0, cache.vocab_size)
    vocab = tokenizer.get_vocab_size()
    assert not allowed[tokenizer.token_to_id("<s>")] and not allowed[tokenizer.token_to_id("<|im_start|>")]
    assert not any(allowed[vocab:]) and all(allowed[t] for t in STOP_IDS)
    assert allowed[tokenizer.token_to_id("a")]


def test_length_bounded_json_strings_refuse_raw_control_characters(tokenizer, cache):
    matcher = cache.matcher(StructuredOutputSpec(json=SCHEMA))
    assert matcher.accept_tokens(tokenizer.encode('{"name": "a', add_special_tokens=False).ids) > 0
    bitmask = allocate_bitmask(1, cache.vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    allowed = _allowed(bitmask, 0, cache.vocab_size)
    control = [
        t for t in range(tokenizer.get_vocab_size()) if re.search("[\x00-\x1f]", tokenizer.decode([t]))
    ]
    assert control and not any(allowed[t] for t in control)  # JSON needs them escaped (xgrammar#800)
    assert allowed[tokenizer.token_to_id("b")]


def test_rollback_restores_the_state(tokenizer, cache):
    matcher = cache.matcher(StructuredOutputSpec(json=SCHEMA))
    prefix = tokenizer.encode('{"name": "x", "age": 4', add_special_tokens=False).ids
    more = tokenizer.encode('2, "score": 1.5', add_special_tokens=False).ids
    bitmask = allocate_bitmask(2, cache.vocab_size)
    assert matcher.accept_tokens(prefix) == len(prefix)
    matcher.fill_bitmask(bitmask, 0)
    assert matcher.accept_tokens(more) == len(more)
    matcher.fill_bitmask(bitmask, 1)
    assert not torch.equal(bitmask[0], bitmask[1])
    matcher.rollback(len(more))
    matcher.fill_bitmask(bitmask, 1)
    assert torch.equal(bitmask[0], bitmask[1])


def test_accept_tokens_stops_at_the_first_refused_token(tokenizer, cache):
    good = tokenizer.encode("123-ab", add_special_tokens=False).ids
    bad = tokenizer.token_to_id("Z")
    matcher = cache.matcher(StructuredOutputSpec(regex=r"\d{3}-[a-z]{2,5}"))
    assert matcher.accept_tokens([*good[:2], bad, *good[2:]]) == 2
    reference = cache.matcher(StructuredOutputSpec(regex=r"\d{3}-[a-z]{2,5}"))
    reference.accept_tokens(good[:2])
    bitmask = allocate_bitmask(2, cache.vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    reference.fill_bitmask(bitmask, 1)
    assert torch.equal(bitmask[0], bitmask[1])
    assert matcher.accept_tokens(good[2:]) == len(good) - 2 and matcher.eos_allowed()
    assert matcher.accept_token(STOP_IDS[0]) and matcher.is_terminated()
    assert not matcher.accept_token(good[0])  # nothing after the stop token


def test_draft_bitmasks_match_stepwise_masks_and_keep_the_state(tokenizer, cache):
    spec = StructuredOutputSpec(regex=r"\d{3}-[a-z]{2,5}")
    digits = tokenizer.encode("123-ab", add_special_tokens=False).ids
    draft = [*digits[:2], tokenizer.token_to_id("Z"), digits[2]]  # the third draft breaks the grammar
    matcher = cache.matcher(spec)
    bitmask = allocate_bitmask(len(draft) + 1, cache.vocab_size)
    bitmask.fill_(0)
    assert matcher.fill_draft_bitmasks(draft, bitmask, 0) == 2
    stepwise = cache.matcher(spec)
    expected = allocate_bitmask(3, cache.vocab_size)
    for i in range(3):  # the masks before each draft up to the refused one
        stepwise.fill_bitmask(expected, i)
        assert stepwise.accept_token(draft[i]) == (i < 2)
    assert torch.equal(bitmask[:3], expected)
    assert (bitmask[3:] == -1).all()  # past the refused draft: unconstrained (the verifier stops there)
    fresh = allocate_bitmask(1, cache.vocab_size)
    matcher.fill_bitmask(fresh, 0)
    assert torch.equal(fresh[0], expected[0])  # state unchanged: the verifier accepts what it keeps later


def test_batched_draft_bitmasks_follow_the_verifier_layout(tokenizer, cache):
    spec = StructuredOutputSpec(regex=r"\d{3}")
    seven = tokenizer.token_to_id("7")
    matchers = [cache.matcher(spec), None, cache.matcher(spec)]
    drafts = [[seven, seven, seven, STOP_IDS[0]], [5, 6], [seven]]  # 5 + 3 + 2 rows
    bitmask = allocate_bitmask(10, cache.vocab_size)
    bitmask.fill_(0)
    filled = fill_draft_bitmasks(matchers, drafts, bitmask)
    assert filled.num_valid == [4, 2, 1] and filled.rows == [0, 1, 2, 3, 4, 8, 9]
    assert (bitmask[5:8] == 0).all()  # the unconstrained request's rows are untouched
    assert _allowed(bitmask, 3, cache.vocab_size)[STOP_IDS[0]]  # after "777": only a stop token
    assert (bitmask[4] == -1).all()  # after the stop token: the request ends, nothing to mask
    assert torch.equal(bitmask[8], bitmask[0])


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (dict(json={"type": "foo"}), "structured_outputs.json"),
        (
            dict(json='{"type": "object"', param="response_format.json_schema.schema"),
            "response_format.json_schema.schema",
        ),
        (dict(json=[1, 2]), "structured_outputs.json"),
        (dict(json={"type": "string", "minLength": 5, "maxLength": 2}), "structured_outputs.json"),
        (dict(regex="(?<=a)b", param="guided_regex"), "guided_regex"),
        (dict(regex="(unclosed"), "structured_outputs.regex"),
        (dict(grammar="root ::= undefined_rule", param="guided_grammar"), "guided_grammar"),
        (dict(grammar='expr ::= "x"'), "structured_outputs.grammar"),
        (dict(choice=[]), "structured_outputs.choice"),
        (dict(choice="yes"), "structured_outputs.choice"),
        (dict(regex="a", choice=["a"]), "structured_outputs"),
        (dict(), "structured_outputs"),
    ],
)
def test_invalid_specs_raise_parameter_error_naming_the_field(kwargs, param):
    with pytest.raises(ParameterError) as info:
        StructuredOutputSpec(**kwargs)
    assert info.value.parameter == param


def test_spec_is_hashable_and_picklable_and_keyed_by_content():
    by_dict = StructuredOutputSpec(json=SCHEMA, param="response_format.json_schema.schema")
    by_text = StructuredOutputSpec(json=json.dumps(SCHEMA, indent=4), param="guided_json")
    assert by_dict == by_text and hash(by_dict) == hash(by_text)  # the field it came from is not the key
    assert by_dict != StructuredOutputSpec(json=SCHEMA, whitespace_flexible=False)
    again = pickle.loads(pickle.dumps(by_dict))
    assert again == by_dict and again.param == by_dict.param and again.kind == "json"
    assert StructuredOutputSpec(choice=["a", "b"]).choice == ("a", "b")


def test_cache_compiles_once_per_spec_and_evicts_the_least_recent(tokenizer):
    cache = GrammarCompilerCache(tokenizer, tokenizer.get_vocab_size(), STOP_IDS, capacity=2)
    a, b, c = (StructuredOutputSpec(regex=r) for r in ("a+", "b+", "c+"))
    first = cache.compile(a)
    assert cache.compile(StructuredOutputSpec(regex="a+", param="guided_regex")) is first
    cache.compile(b)
    cache.compile(a)  # now b is the least recent
    cache.compile(c)
    assert len(cache) == 2 and cache.compile(a) is first
    assert cache.compile(b) is not None and len(cache) == 2


def test_cpu_application_equals_an_explicit_loop():
    gen = torch.Generator().manual_seed(0)
    vocab, rows = 200, [0, 2, 3]
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, 7), dtype=torch.int32, generator=gen)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):  # float64: the torch path
        logits = torch.randn(4, vocab, generator=gen).to(dtype)
        expected = logits.clone()
        for r in rows:
            for j, ok in enumerate(_allowed(bitmask, r, vocab)):
                if not ok:
                    expected[r, j] = float("-inf")
        for apply in (apply_bitmask, apply_bitmask_torch):
            got = logits.clone()
            apply(got, bitmask, rows)
            assert torch.equal(got, expected), (dtype, apply.__name__)


def test_padded_logits_width_is_masked_and_unconstrained_rows_untouched(tokenizer, cache):
    vocab = tokenizer.get_vocab_size()
    matchers = [None, cache.matcher(StructuredOutputSpec(json_object=True))]
    bitmask = allocate_bitmask(2, cache.vocab_size)
    logits = torch.randn(2, cache.vocab_size)  # [B, V + padding]
    before = logits.clone()
    rows = fill_bitmasks(matchers, bitmask)
    apply_bitmask(logits, bitmask, rows)
    assert rows == [1] and torch.equal(logits[0], before[0])
    assert torch.isinf(logits[1, vocab:]).all()
    assert torch.isfinite(logits[1]).sum() == sum(_allowed(bitmask, 1, cache.vocab_size)) > 0


def test_apply_refuses_a_bitmask_narrower_than_the_logits(cache):
    with pytest.raises(ValueError, match="does not cover"):
        apply_bitmask(torch.zeros(1, 65), allocate_bitmask(1, 64), [0])


def _byte_fallback_tokenizer() -> Tokenizer:
    """A SentencePiece-style (Llama 2, Mistral) vocabulary: "▁" for a space, <0xNN> pieces for bytes."""
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", *"abcdefghij0123456789"]
    merges = [("▁", "a"), ("b", "c"), ("▁a", "bc")]
    pieces += ["".join(m) for m in merges]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok


def test_byte_fallback_vocabularies_are_supported():
    tok = _byte_fallback_tokenizer()
    cache = GrammarCompilerCache(tok, tok.get_vocab_size(), [2])
    pattern = r"(abc|é[a-j]{1,3}) [0-9]{2}"
    for seed in range(6):
        tokens = _walk(cache, cache.matcher(StructuredOutputSpec(regex=pattern)), seed)
        assert re.fullmatch(pattern, tok.decode(tokens)), tok.decode(tokens)


@pytest.mark.gpu
def test_cuda_application_equals_the_cpu_one(tokenizer, cache):
    matchers = [
        cache.matcher(StructuredOutputSpec(json=SCHEMA)),
        None,
        cache.matcher(StructuredOutputSpec(choice=CHOICES)),
    ]
    bitmask = allocate_bitmask(3, cache.vocab_size, pin_memory=True)
    rows = fill_bitmasks(matchers, bitmask)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(3, cache.vocab_size).to(dtype)
        on_gpu = logits.cuda()
        apply_bitmask(logits, bitmask, rows)
        apply_bitmask(on_gpu, bitmask, rows)
        assert torch.equal(on_gpu.cpu(), logits)
