"""OpenAI-compatible request and response bodies (pydantic, at the edge only) and their error body."""

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.errors import ParameterError
from engine.sampling_params import MAX_LOGPROBS, SEED_RANGE, SamplingParams
from engine.structured_output import StructuredOutputSpec


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (no constraint), json_object (any JSON object), json_schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` object: exactly one of these."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class DocumentRef(BaseModel):
    """A document of a RAG prompt (engine/documents.py): one stored through /v1/documents, by id, or its text."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    text: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> "DocumentRef":
        if (self.id is None) == (self.text is None):
            raise ParameterError("id", "a document gives exactly one of 'id' and 'text'")
        return self


class DocumentRecomputeFields(BaseModel):
    """Which tokens of each reused document are recomputed in the prompt (engine/documents.py:
    DocumentRecompute); a field left out keeps the pool's setting."""

    model_config = ConfigDict(extra="forbid")
    first_tokens: int | None = None
    ratio: float | None = None
    select_layer: int | None = None


class DocumentCreateRequest(BaseModel):
    """POST /v1/documents: a document's KV computed now and kept, for prompts to name by id."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(..., min_length=1)
    model: str | None = None
    cache_salt: str | None = None


class DocumentFields(BaseModel):
    """The RAG extension both endpoints share: documents whose KV is reused from the document cache."""

    documents: list[DocumentRef] | None = Field(default=None, min_length=1)
    document_recompute: DocumentRecomputeFields | None = None


class SamplingFields(BaseModel):
    """The sampling parameters both endpoints share, OpenAI's plus the ones vLLM users expect. A field
    this server does not know is a 400 naming it (extra="forbid"), never silently dropped."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    best_of: int | None = Field(default=None, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    cache_salt: str | None = None
    priority: int | None = None  # the SLO class by its priority (control_plane/slo.py); or header x-slo-class
    return_token_ids: bool = False  # vLLM's extension: prompt and completion token ids in the response
    user: str | None = None  # recorded on the request's trace span
    min_tokens: int = Field(default=0, ge=0)  # vLLM's extension
    # bounded as OpenAI and vLLM bound them; applied on the device (engine/logits_processors.py)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    logit_bias: dict[int, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured_output(self) -> StructuredOutputSpec | None:
        """The one constraint the request asks for (a 400 naming the fields when it asks for several).
        JSON is compact (no free whitespace: a weak model could otherwise loop on spaces)."""
        given: list[tuple[str, dict[str, Any]]] = []
        if (fmt := self.response_format) is not None and fmt.type != "text":
            if fmt.type == "json_object":
                given.append(("response_format", {"json_object": True}))
            elif fmt.json_schema is None:
                raise ParameterError("response_format.json_schema", "required when type is 'json_schema'")
            else:
                schema = fmt.json_schema.json_schema or {"type": "object"}
                given.append(
                    ("response_format.json_schema", {"json": schema, "strict": bool(fmt.json_schema.strict)})
                )
        if (so := self.structured_outputs) is not None:
            kinds = {"json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar}
            given += [(f"structured_outputs.{k}", {k: v}) for k, v in kinds.items() if v is not None]
        legacy = {"json": self.guided_json, "regex": self.guided_regex, "choice": self.guided_choice}
        given += [(f"guided_{k}", {k: v}) for k, v in legacy.items() if v is not None]
        if self.guided_grammar is not None:
            given.append(("guided_grammar", {"grammar": self.guided_grammar}))
        if len(given) > 1:
            raise ParameterError(given[1][0], f"only one structured output per request (also {given[0][0]})")
        if not given:
            return None
        param, kind = given[0]
        return StructuredOutputSpec(**kind, whitespace_flexible=False, param=param)

    def sampling_params(
        self,
        default_max_tokens: int | None,
        logprobs: int | None,
        structured_output: StructuredOutputSpec | None = None,
    ) -> SamplingParams:
        """`structured_output`: the endpoint's own constraint (a forced tool call), instead of the fields'."""
        if self.best_of is not None and self.best_of != self.n:
            raise ParameterError(
                "best_of", f"only equal to n ({self.n}): every sampled sequence is returned, none is ranked"
            )
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop is not None and len(stop) > 4:
            raise ParameterError("stop", "at most 4 sequences")
        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            max_tokens=self.max_tokens or default_max_tokens,
            stop=stop,
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=dict(self.logit_bias) if self.logit_bias else None,
            min_tokens=self.min_tokens,
            structured_output=structured_output or self.structured_output(),
        )


Prompt = str | list[int]
MAX_PROMPTS = 64  # prompts in one completions request (each is a request to the engine)


class CompletionRequest(SamplingFields, DocumentFields):
    """`documents` go after the tokenizer's start token and before the prompt (chat places them anywhere,
    as document content parts)."""

    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        ..., description="text, token ids, or a list of either (a batch)"
    )
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @model_validator(mode="after")
    def _checked(self) -> "CompletionRequest":
        prompts = self.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ParameterError("prompt", "must not be empty (nor any prompt in a list)")
        if len(prompts) > MAX_PROMPTS:
            raise ParameterError("prompt", f"{len(prompts)} prompts, at most {MAX_PROMPTS} in one request")
        if self.echo and self.logprobs is not None:
            raise ParameterError("echo", "not with logprobs: prompt logprobs are not computed")
        if len(prompts) > 1 and self.return_token_ids:
            raise ParameterError("return_token_ids", "only with a single prompt")
        return self

    def prompts(self) -> list[Prompt]:
        """The batch: one entry per prompt, each text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]  # a str, or one list of token ids
        return list(prompt)  # type: ignore[arg-type]  # list[str] | list[list[int]]


class TextPart(BaseModel):
    """A text part, or a document part ({"type": "document", "id"} or {"type": "document", "text"}): a document
    whose KV is reused from the document cache wherever the part sits (engine/documents.py)."""

    model_config = ConfigDict(extra="forbid")
    type: str
    text: str = ""
    id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data):
        """Before the fields: an image part's own fields are not the reason it is refused."""
        if isinstance(data, dict) and data.get("type") not in ("text", "document"):
            raise ParameterError(
                "type",
                f"{data.get('type')!r} parts are not supported: this model reads 'text' and 'document'",
            )
        return data

    @model_validator(mode="after")
    def _document_named(self) -> "TextPart":
        if self.type == "text" and self.id is not None:
            raise ParameterError("id", "only a 'document' part has an id")
        if self.type == "document" and (self.id is None) == (not self.text):
            raise ParameterError("id", "a document part gives exactly one of 'id' and 'text'")
        return self

    @property
    def document(self) -> DocumentRef | None:
        if self.type != "document":
            return None
        return DocumentRef(id=self.id) if self.id is not None else DocumentRef(text=self.text)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None  # an assistant turn's calls (services/tool_calls.py)
    tool_call_id: str | None = None  # a tool turn's answer to one of them

    @model_validator(mode="after")
    def _content_given(self) -> "ChatMessage":
        """Text parts are joined by newlines (as vLLM does), unless there are document parts (the frontend
        places those); only an assistant turn may leave its content null (OpenAI: when it made tool calls)."""
        if isinstance(self.content, list) and all(part.type == "text" for part in self.content):
            self.content = "\n".join(part.text for part in self.content)
        if self.content is None:
            if self.role != "assistant":
                raise ParameterError(
                    "content", f"required for a {self.role!r} message (null only for 'assistant')"
                )
            self.content = ""
        return self


class ChatCompletionRequest(SamplingFields, DocumentFields):
    """`documents` go at the start of the last user message, as document parts would."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None  # checked by services/tool_calls.py
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True  # false: at most one call (the grammar's, or the first parsed)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
