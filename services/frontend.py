"""The OpenAI-compatible HTTP app over an engine client (engine/protocol.py:EngineClient): AsyncLLM in this
process, or the Ray pools' DisaggregatedClient. Routes, the API key, request ids and error bodies live
here; each endpoint parses and checks its request and hands it to the shared generation path
(services/openai_serving.py), which openai_render.py shapes into the endpoint's response.

Errors are OpenAI error bodies: 400 bad input (param from pydantic's error location or the ParameterError),
401 missing or wrong API key, 404 unknown model or path, 408/413 a body too slow or too large
(services/http_limits.py), 429 overload, 503 no engine, 500 a server bug (with the request id, which the
`x-request-id` header carries too). A client that disconnects aborts its request.
"""

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.async_llm import EngineDeadError
from engine.documents import DocumentSpan
from engine.errors import ParameterError
from engine.structured_output import StructuredOutputSpec
from engine.tokenizer import Tokenizer
from services.documents import (
    DocumentStore,
    check_length,
    document_tokens,
    join,
    split_rendered,
    with_placeholders,
)
from services.http_limits import MAX_BODY_BYTES, BodyLimit
from services.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DocumentCreateRequest,
    DocumentFields,
    DocumentRef,
    error_body,
    now,
)
from services.openai_render import ChatRenderer, CompletionRenderer
from services.openai_serving import Generation, HTTPError, OpenAIServing, internal_error_body
from services.request_metrics import count_outcome
from services.tool_calls import (
    ChatTool,
    ToolChoice,
    guided_schema,
    parse_tool_choice,
    parse_tools,
    template_messages,
    template_tools,
)

logger = logging.getLogger("ridgeline.frontend")
Model = TypeVar("Model", bound=BaseModel)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _validation_message(err: ValidationError) -> tuple[str, str]:
    """(message, param) of the first error (one a validator raised naming its field, when a union's members
    all failed): its location without pydantic's union-member tags, and the field the ParameterError
    names; an unknown field is said to be unsupported."""
    errors = err.errors()
    first = next((e for e in errors if isinstance(e.get("ctx", {}).get("error"), ParameterError)), errors[0])
    loc = [str(p) for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, ParameterError):
        param = ".".join([*loc, cause.parameter])
        return f"{param}: {cause.detail}", param
    param = ".".join(loc)
    if first["type"] == "extra_forbidden":
        return f"{param}: not supported by this server (unknown field)", param
    return f"{param}: {first['msg'].removeprefix('Value error, ')}", param


async def _parse(request: Request, model_cls: type[Model]) -> Model:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise HTTPError(413, f"request body: {len(raw)} bytes, at most {MAX_BODY_BYTES}")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise HTTPError(400, "request body: JSON nested too deeply") from None
    if (where := _lone_surrogate(data)) is not None:
        raise HTTPError(
            400, f"{where}: contains a lone UTF-16 surrogate, which is not valid Unicode text", param=where
        )
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        message, param = _validation_message(e)
        raise HTTPError(400, message, param=param) from None


def _lone_surrogate(data, path: str = "") -> str | None:
    """The path of the first string (key or value) holding a lone surrogate, or None. Iterative: the depth
    is already bounded by the JSON parser."""
    stack = [(path, data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((f"{where}.{key}" if where else str(key), key))
                stack.append((f"{where}.{key}" if where else str(key), item))
        elif isinstance(value, list):
            stack.extend((f"{where}.{i}", item) for i, item in enumerate(value))
    return None


def build_frontend(
    serving: OpenAIServing,
    api_key: str | None = None,
    pools: Callable[[], Awaitable[list[dict]]] | None = None,
    app_metrics: Callable[[], Awaitable[bytes]] | None = None,
) -> FastAPI:
    """The HTTP app: /v1/completions, /v1/chat/completions, /v1/documents, /v1/models, /v1/pools, /health,
    /metrics.

    `serving` holds the engine client (AsyncLLM in this process, or the Ray pools' DisaggregatedClient)
    with the model name, SLO classes, admission, in-flight cap and prices; `api_key` guards every path
    but /health; `pools()` lists the pools for /v1/pools; `app_metrics()` renders /metrics for the whole
    app (default: this process's registry)."""
    llm, model_name = serving.llm, serving.model_name
    store = DocumentStore()  # documents stored through /v1/documents
    app = FastAPI(title="Ridgeline", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit)  # outermost: nothing reads a body past the limit
    _add_error_handlers(app, model_name)
    _add_request_ids_and_auth(app, api_key)

    @app.get("/health")
    async def health():
        """200 while the engine serves; 503 when an in-process engine's loop died or stalled (the Ray pools'
        replicas answer Serve's own health checks, which replace them)."""
        try:
            llm.check_health()
        except EngineDeadError as e:
            logger.error("health check failed: %r", e)
            return JSONResponse(
                error_body("the engine is not serving", "server_error", code="engine_dead"), status_code=503
            )
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        body = await app_metrics() if app_metrics is not None else generate_latest()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": now(),
                    "owned_by": "ridgeline",
                    "max_model_len": llm.max_model_len,
                }
            ],
        }

    @app.get("/v1/pools")
    async def list_pools():
        """Admin, read-only: each pool's configuration (device, replicas, price, dtypes) and live workers."""
        return {"object": "list", "data": await pools() if pools is not None else []}

    @app.post("/v1/completions")
    async def completions(http: Request):
        req = await _parse(http, CompletionRequest)
        serving.check_model(req.model)
        serving.check_logprobs(req.logprobs, "logprobs")
        params = _checked(req.sampling_params, default_max_tokens=16, logprobs=req.logprobs)
        slo = serving.slo_class(http, req.priority)
        rid = f"cmpl-{http.state.request_id}"
        prompts = req.prompts()
        spans = None
        if req.documents:
            prompts, spans = await _completion_documents(serving, store, req, prompts)
        echo = [p if isinstance(p, str) else llm.tokenizer.decode(p) for p in prompts] if req.echo else None
        renderer = CompletionRenderer(
            rid, now(), model_name, llm.tokenizer, req.return_token_ids, echo, req.n
        )
        gen = Generation(
            prompts,
            params,
            req.cache_salt,
            slo,
            "text_completion",
            req.stream,
            _usage_wanted(req),
            req.user,
            spans,
            _recompute(req),
        )
        return await serving.respond(http, rid, gen, renderer)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        req = await _parse(http, ChatCompletionRequest)
        serving.check_model(req.model)
        top = req.top_logprobs or 0
        serving.check_logprobs(req.top_logprobs, "top_logprobs")
        tools, choice, forced = _checked(_tool_calling, req=req)
        params = _checked(
            req.sampling_params,
            default_max_tokens=None,
            logprobs=top if req.logprobs else None,
            structured_output=forced,
        )
        if req.max_completion_tokens:
            params.max_tokens = req.max_completion_tokens
        offered = template_tools(tools) if choice != "none" else None
        prompt, spans = await _chat_prompt(serving, store, req, offered)
        slo = serving.slo_class(http, req.priority)
        rid = f"chatcmpl-{http.state.request_id}"
        renderer = ChatRenderer(
            rid, now(), model_name, llm.tokenizer, req.return_token_ids, top, choice, req.parallel_tool_calls
        )
        gen = Generation(
            [prompt],
            params,
            req.cache_salt,
            slo,
            "chat",
            req.stream,
            _usage_wanted(req),
            req.user,
            spans,
            _recompute(req),
        )
        return await serving.respond(http, rid, gen, renderer)

    _add_document_routes(app, serving, store)
    return app


def _add_document_routes(app: FastAPI, serving: OpenAIServing, store: DocumentStore) -> None:
    """POST /v1/documents computes a document's KV now and keeps it (the in-process engine pins it in its
    document cache); prompts then name it by id. GET lists a tenant's (by cache_salt), DELETE drops one."""
    llm = serving.llm

    @app.post("/v1/documents")
    async def create_document(http: Request):
        req = await _parse(http, DocumentCreateRequest)
        if req.model is not None:
            serving.check_model(req.model)
        ids = await serving.tokenize(req.text, False)
        _checked(check_length, ids=ids, max_len=llm.max_model_len)
        _checked(store.check_room, token_ids=ids, cache_salt=req.cache_salt)
        try:
            await llm.add_document(ids, req.cache_salt)
        except ValueError as e:
            raise HTTPError.bad_request(e) from None
        return store.add(ids, req.cache_salt).describe()

    @app.get("/v1/documents")
    async def list_documents(cache_salt: str | None = None):
        return {"object": "list", "data": [d.describe() for d in store.list(cache_salt)]}

    @app.delete("/v1/documents/{doc_id}")
    async def delete_document(doc_id: str, cache_salt: str | None = None):
        doc = store.remove(doc_id, cache_salt)
        if doc is None:  # raised, not returned: counted as an invalid request like every error
            raise HTTPError(404, f"document {doc_id!r} not found", param="document_id", code="not_found")
        await llm.remove_document(doc.token_ids, cache_salt)
        return {"id": doc_id, "object": "document.deleted", "deleted": True}


async def _completion_documents(
    serving: OpenAIServing, store: DocumentStore, req: CompletionRequest, prompts: list
) -> tuple[list, list[tuple[DocumentSpan, ...]]]:
    """Each prompt with the documents after the tokenizer's start token, before the prompt's own tokens."""
    if req.echo:
        raise HTTPError(400, "echo: not with documents", param="echo")
    docs = await _resolved(serving, store, req.cache_salt, req.documents or [])
    start = await serving.tokenize("", True)
    built = []
    for p in prompts:
        if isinstance(p, str):
            head, rest = start, await serving.tokenize(p, False)
        else:  # token ids: the client's own start tokens (if any) go before the documents
            head = start if start and list(p[: len(start)]) == start else []
            rest = list(p[len(head) :])
        built.append(join([head] + [[]] * (len(docs) - 1) + [rest], docs))
    return [ids for ids, _ in built], [s for _, s in built]


async def _chat_prompt(
    serving: OpenAIServing, store: DocumentStore, req: ChatCompletionRequest, offered: list[dict] | None
) -> tuple[list[int], list[tuple[DocumentSpan, ...]] | None]:
    """The conversation's token ids through the chat template, and its document segments (services/documents.py)
    when it has document parts or a documents field."""
    raw = [m.model_dump(exclude_none=True) for m in req.messages]
    refs = None
    if req.documents or any(isinstance(m.get("content"), list) for m in raw):
        raw, refs = _checked(with_placeholders, messages=raw, extra=req.documents or [])
    messages = _checked(template_messages, messages=raw)
    text = await asyncio.to_thread(_render_chat, serving.llm.tokenizer, messages, offered)
    if refs is None:
        return await serving.tokenize(text, add_special_tokens=False), None  # the template wrote them
    pieces = _checked(split_rendered, text=text, count=len(refs))
    docs = await _resolved(serving, store, req.cache_salt, refs)
    prompt, spans = join([await serving.tokenize(p, False) for p in pieces], docs)
    return prompt, [spans]


async def _resolved(
    serving: OpenAIServing, store: DocumentStore, cache_salt: str | None, refs: list[DocumentRef]
) -> list[list[int]]:
    """The documents' tokens; an unknown id or an oversize document is the client's 400."""
    try:
        return await document_tokens(refs, store, cache_salt, serving.tokenize, serving.llm.max_model_len)
    except ValueError as e:
        raise HTTPError.bad_request(e) from None


def _recompute(req: DocumentFields) -> dict | None:
    return None if req.document_recompute is None else req.document_recompute.model_dump(exclude_none=True)


def _count_unserved(request: Request, model_name: str, outcome: str) -> None:
    if not getattr(request.state, "counted", False):  # ended before it was served
        request.state.counted = True
        count_outcome(model_name, getattr(request.state, "slo_name", "none"), outcome)


def _add_error_handlers(app: FastAPI, model_name: str) -> None:
    """Every error in OpenAI's shape, and every request that ends unserved counted once."""

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        outcome = "rejected" if exc.status == 429 else "error" if exc.status >= 500 else "invalid"
        _count_unserved(request, model_name, outcome)
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _route_error(request: Request, exc: StarletteHTTPException):
        """Unknown paths and methods answer in OpenAI's error shape too."""
        _count_unserved(request, model_name, "invalid")
        body = error_body(
            f"{request.method} {request.url.path}: {exc.detail}",
            code="not_found" if exc.status_code == 404 else None,
        )
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        rid = getattr(request.state, "request_id", "unknown")
        logger.error("request %s failed", rid, exc_info=exc)
        _count_unserved(request, model_name, "error")
        return JSONResponse(internal_error_body(rid), status_code=500, headers={"x-request-id": rid})


def _add_request_ids_and_auth(app: FastAPI, api_key: str | None) -> None:
    """Each request's id (the x-request-id header) and arrival time; the API key, when one is set."""

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        request.state.received, request.state.received_ns = time.perf_counter(), time.time_ns()
        request.state.request_id = rid = uuid.uuid4().hex
        path, root = request.scope["path"], request.scope.get("root_path", "")
        if api_key is not None and path.removeprefix(root) != "/health":  # root: a mounted prefix
            header = request.headers.get("authorization", "")
            token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return JSONResponse(
                    error_body(
                        "missing or wrong API key (Authorization: Bearer <key>)",
                        "authentication_error",
                        code="invalid_api_key",
                    ),
                    status_code=401,
                )
        response = await call_next(request)
        response.headers["x-request-id"] = rid
        return response


def _checked(make, **kwargs):
    """make(**kwargs), a ValueError from it being the client's 400."""
    try:
        return make(**kwargs)
    except ValueError as e:
        raise HTTPError.bad_request(e) from None


def _usage_wanted(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def _tool_calling(
    req: ChatCompletionRequest,
) -> tuple[list[ChatTool] | None, ToolChoice, StructuredOutputSpec | None]:
    """(tools, tool_choice, the grammar a required or named choice forces on the output)."""
    tools = parse_tools(req.tools)
    choice = parse_tool_choice(req.tool_choice, tools)
    schema = guided_schema(tools, choice)
    if schema is None:
        return tools, choice, None
    if choice == "required" and not req.parallel_tool_calls:
        schema = {**schema, "maxItems": 1}
    if req.structured_output() is not None:
        raise ParameterError(
            "tool_choice", "a required or named tool choice cannot have a response_format too"
        )
    return tools, choice, StructuredOutputSpec(json=schema, whitespace_flexible=False, param="tool_choice")


def _render_chat(tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The chat prompt's text (tools offered through the template); a template that refuses the
    conversation is the client's 400."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, tools=tools)
    except (ValueError, TemplateError) as e:
        raise HTTPError(
            400, f"messages: the model's chat template refused them: {e}", param="messages"
        ) from None
