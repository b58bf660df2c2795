"""Tokenizer from `tokenizer.json`; the chat template, rendered with jinja2, from the first of: the one given
(`--chat-template`: a file or the template itself), the model directory's `chat_template.jinja` (where
current transformers saves it), `tokenizer_config.json`'s `chat_template`."""

import functools
import json
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from engine.errors import ParameterError

# a longer text is tokenized without holding the GIL (seconds for megabytes: other threads must run)
_GIL_FREE_ABOVE_CHARS = 16_384


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _raise(message: str):
    raise TemplateError(message)


def load_chat_template(template: str | Path) -> str:
    """A `--chat-template` value as vLLM takes it: a file's contents, else the template itself (a value with
    a Jinja character). One with none that is no readable file is a mistyped path: ValueError. Loading a
    template's text again gives it back unchanged, so every layer may call this."""
    text = str(template)
    try:
        return Path(template).read_text()
    except (OSError, ValueError) as e:  # ValueError: a NUL in it
        if not any(c in text for c in "{}\n"):
            reason = e.strerror if isinstance(e, OSError) else e
            raise ValueError(
                f"chat_template: {text!r} looks like a file path but cannot be read ({reason})"
            ) from None
        return text


def model_chat_template(model_dir: Path, tokenizer_config: dict) -> str | None:
    """The model's own template: chat_template.jinja, else tokenizer_config.json's (its default one)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


class Tokenizer:
    def __init__(self, model_dir: str | Path, chat_template: str | None = None):
        """chat_template: overrides the model's (a file path or the template, see load_chat_template)."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise ParameterError("model", f"{model_dir} has no tokenizer.json")
        self._tok = HFTokenizer.from_file(str(path))
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.chat_template = (
            load_chat_template(chat_template) if chat_template else model_chat_template(model_dir, cfg)
        )
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self._template = None
        if self.chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals.update(raise_exception=_raise, strftime_now=lambda f: datetime.now().strftime(f))
            self._template = env.from_string(self.chat_template)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @functools.cached_property
    def max_chars_per_token(self) -> int:
        """An upper bound on the characters of text one token stands for: the longest vocabulary entry (a
        byte-level or metaspace entry is never shorter than its text), times 4 where a normalizer may shrink
        the text first. A text longer than max_model_len times this cannot fit the context."""
        longest = max((len(entry) for entry in self._tok.get_vocab(with_added_tokens=True)), default=1)
        return longest * (1 if self._tok.normalizer is None else 4)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > _GIL_FREE_ABOVE_CHARS:  # encode_batch releases the GIL while it works; encode may not
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        tools: list[dict] | None = None,
    ):
        """tools: function definitions the template renders into the prompt (OpenAI's `tools`), or None."""
        if self._template is None:
            raise ParameterError(
                "messages",
                "this model has no chat_template (no chat_template.jinja, none in tokenizer_config.json); "
                "give one with --chat-template",
            )
        if not messages or any(not isinstance(m, dict) or "role" not in m for m in messages):
            raise ParameterError("messages", "a non-empty list of {'role': ..., 'content': ...} objects")
        text = self._template.render(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text
