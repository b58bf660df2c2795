"""The OpenAI-compatible HTTP frontend over an engine client (today AsyncLLM in this process; the Ray Serve
deployments drive the same app in the serving work).

Every error a client can cause returns an OpenAI error body: 400 bad input, 401 missing or wrong API key,
404 unknown model, 408/413 a body too slow or too large (services/http_limits.py), 429 + Retry-After when the
request's SLO class cannot meet its TTFT target (control_plane/admission.py) or the requests in flight fill
what its class may use (SLOTable.inflight_limit), 503 + Retry-After when no engine can serve. A server-side
failure is a 500 or 503 whose body names the request id and nothing internal; the traceback goes to the log
under that id (also the `x-request-id` header).
A client that disconnects aborts its request. Usage carries `cost_usd` when every pool that served the
request has a price (services/accounting.py).
"""

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from control_plane.admission import AdmissionController, Overloaded, Ticket
from control_plane.concurrency_limit import ConcurrencyLimit
from control_plane.cost import PriceList
from control_plane.slo import DEFAULT_SLO_TABLE, SLOClass, SLOTable
from engine.async_llm import AsyncLLM, EngineDeadError
from engine.outputs import RequestOutput
from observability import tracing
from observability.metrics import ADMISSION_REJECTED
from services.accounting import RequestAccount
from services.http_limits import MAX_BODY_BYTES, BodyLimit
from services.openai_protocol import ChatCompletionRequest, CompletionRequest, error_body, now
from services.request_metrics import RequestRecord, count_outcome, outcome_of
from services.worker_protocol import WorkerLostError

logger = logging.getLogger("ridgeline.frontend")

# the engine (or every worker that could continue a request) is gone: the client may retry later
UNAVAILABLE = (EngineDeadError, WorkerLostError)


class HTTPError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers

    @classmethod
    def bad_request(cls, error: ValueError) -> "HTTPError":
        """A ValueError from our validation names its field first: "field: what is wrong"."""
        message = str(error)
        return cls(400, message, param=message.split(":")[0])

    @classmethod
    def unavailable(cls, http: Request, error: BaseException) -> "HTTPError":
        """503 for a dead engine or lost workers: the cause goes to the log, not to the client."""
        rid = http.state.request_id
        logger.warning("request %s: no engine could serve it: %r", rid, error)
        return cls(
            503,
            f"no engine could serve this request right now; retry later (request id {rid})",
            type_="server_error",
            code="service_unavailable",
            headers={"Retry-After": "5"},
        )


def internal_error_body(request_id: str) -> dict:
    return error_body(
        f"internal server error (request id {request_id}); the server log has the cause",
        "server_error",
        code="internal_error",
    )


def _validation_message(err: ValidationError) -> tuple[str, str]:
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"])
    return f"{param}: {first['msg'].removeprefix('Value error, ')}", param


async def _parse(request: Request, model_cls: type[BaseModel]) -> BaseModel:
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


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


class Frontend:
    def __init__(
        self,
        llm: AsyncLLM,
        model_name: str,
        max_inflight: int,
        slo_table: SLOTable = DEFAULT_SLO_TABLE,
        prices: PriceList | None = None,
        default_pool: str = "engine",
        admission: AdmissionController | None = None,
        concurrency: ConcurrencyLimit | None = None,
    ):
        self.slo_table = slo_table
        self.llm = llm
        self.model_name = model_name
        self.max_inflight = max_inflight
        self.prices = prices or PriceList({})
        self.default_pool = default_pool
        self.admission = admission
        self.inflight = 0  # requests between their slot and their end (this frontend's own count: no await)
        self.concurrency = concurrency  # the cap found under load (control_plane/concurrency_limit.py)

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise HTTPError(
                404,
                f"model: {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def slo_class(self, http: Request, priority: int | None):
        """The request's SLO class (control_plane/slo.py): header x-slo-class, else body priority. 503 when
        the in-flight requests already fill what the class may use of max_inflight (SLOTable.inflight_limit)."""
        try:
            slo = self.slo_table.resolve(http.headers.get("x-slo-class"), priority)
        except ValueError as e:
            raise HTTPError(
                400, str(e), param="priority" if str(e).startswith("priority") else "x-slo-class"
            ) from None
        http.state.slo_name = slo.name
        return slo

    def _take_slot(self, slo: SLOClass) -> tuple[float, int]:
        """Count a request in flight, or refuse it (429: overload is the client's to retry) when the requests
        in flight fill what its class may use (SLOTable.inflight_limit) of the cap: the adaptive limit when
        there is one, never above max_inflight. Returns (when, how many were in flight before it)."""
        if (
            self.concurrency is not None
            and self.admission is not None
            and (late := self.admission.most_overdue()) is not None
        ):  # already late: no need to wait for it
            self.concurrency.observe(
                time.monotonic() - late.admitted_at, late.slo.ttft_ms / 1000, late.admitted_at, 0
            )
        cap = (
            self.max_inflight if self.concurrency is None else min(self.max_inflight, self.concurrency.value)
        )
        limit = self.slo_table.inflight_limit(slo, cap)
        if self.inflight >= limit:
            raise HTTPError(
                429,
                f"server busy: {limit} requests in flight, the most class {slo.name!r} may add "
                "to; retry after 1 s",
                type_="rate_limit_error",
                code="server_busy",
                headers={"Retry-After": "1"},
            )
        self.inflight += 1
        return time.monotonic(), self.inflight - 1

    def _free_slot(self) -> None:
        self.inflight -= 1

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text prompt, off the event loop (a 4 MB prompt takes seconds). A text longer than
        the context could hold even in the tokenizer's longest tokens is refused before any work."""
        limit = self.llm.max_model_len * self.llm.tokenizer.max_chars_per_token
        if len(text) > limit:
            raise HTTPError(
                400,
                f"prompt: {len(text)} characters cannot fit this model's context of "
                f"{self.llm.max_model_len} tokens (at most {limit} characters)",
                param="prompt",
            )
        return await asyncio.to_thread(self.llm.tokenizer.encode, text, add_special_tokens)

    def _admit(self, slo: SLOClass, prompt_ids: list[int]) -> Ticket | None:
        if self.admission is None:
            return None
        try:
            return self.admission.admit(slo, len(prompt_ids))
        except Overloaded as e:
            ADMISSION_REJECTED.labels(self.model_name, slo.name).inc()
            raise HTTPError(
                429,
                str(e),
                type_="rate_limit_error",
                code="slo_overloaded",
                headers={"Retry-After": str(e.retry_after_s)},
            ) from None

    def _span(self, http: Request, operation: str, request_id: str, params):
        """The request's SERVER span, a child of the client's traceparent when it sent one."""
        return tracing.tracer().start_span(
            f"{operation} {self.model_name}",
            context=tracing.extract(http.headers),
            kind=tracing.SpanKind.SERVER,
            start_time=http.state.received_ns,
            attributes={
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": "ridgeline",
                "gen_ai.request.model": self.model_name,
                "gen_ai.response.id": request_id,
                "gen_ai.request.max_tokens": params.max_tokens or 0,
                "gen_ai.request.temperature": params.temperature,
                "gen_ai.request.top_p": params.top_p,
                "gen_ai.request.choice.count": params.n,
                "ridgeline.slo_class": http.state.slo_name,
            },
        )

    async def start(
        self,
        http: Request,
        request_id: str,
        prompt,
        params,
        cache_salt,
        slo: SLOClass,
        operation: str = "text_completion",
    ) -> "Flight":
        """The first output of a request: bad input and admission surface here, before any byte of the
        response. The flight's stream is accounted (cost) and timed (metrics) as it is consumed."""
        if not prompt:
            raise HTTPError(400, "prompt: must not be empty", param="prompt")
        taken_at, inflight_before = self._take_slot(slo)
        try:
            prompt_ids = await self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
            ticket = self._admit(slo, prompt_ids)
        except BaseException:
            self._free_slot()
            raise
        account = RequestAccount(self.prices, self.model_name, slo.name, self.default_pool)
        span = self._span(http, operation, request_id, params)
        record = RequestRecord(self.model_name, slo, http.state.received, span, on_finish=self._free_slot)
        stream = self.llm.generate(
            request_id,
            prompt_ids,
            params,
            cache_salt=cache_salt,
            priority=slo.priority,
            preemptible=slo.preemptible,
            slo_class=slo.name,
            trace_context=tracing.inject(span),
        )
        try:
            first = await anext(stream)
        except BaseException as e:
            if ticket is not None:  # nothing will come: it leaves the queue without draining it
                self.admission.cancel(ticket)
            http.state.counted = True
            record.finish(None, "invalid" if isinstance(e, ValueError) else "error")
            if isinstance(e, ValueError):
                raise HTTPError.bad_request(e) from None
            if isinstance(e, UNAVAILABLE):
                raise HTTPError.unavailable(http, e) from None
            raise
        if ticket is not None:
            self.admission.first_token(ticket)
        if self.concurrency is not None:
            self.concurrency.observe(
                time.monotonic() - taken_at, slo.ttft_ms / 1000, taken_at, inflight_before
            )
        account.update(first)
        record.output(first)
        return Flight(first, _observed(stream, account, record), account, record)

    async def final(self, http: Request, flight: "Flight") -> RequestOutput | None:
        """Drain a request; None if the client went away (the request is then aborted)."""
        first, stream, record = flight.first, flight.stream, flight.record

        async def drain():
            last = first
            if not first.finished:
                async for out in stream:
                    last = out
            return last

        task = asyncio.create_task(drain())
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.1)
            if done:
                try:
                    out = task.result()
                except UNAVAILABLE as e:
                    record.finish(None, "error")
                    http.state.counted = True
                    raise HTTPError.unavailable(http, e) from None
                except Exception:
                    record.finish(None, "error")
                    http.state.counted = True
                    raise
                record.finish(out, outcome_of(out))
                return out
            if await http.is_disconnected():
                task.cancel()  # the stream's cleanup aborts the request
                await asyncio.gather(task, return_exceptions=True)
                record.finish(None, "aborted")
                return None

    def usage(self, out: RequestOutput, account: RequestAccount) -> dict:
        completion = sum(len(c.token_ids) for c in out.outputs)
        usage = {
            "prompt_tokens": len(out.prompt_token_ids),
            "completion_tokens": completion,
            "total_tokens": len(out.prompt_token_ids) + completion,
        }
        if out.num_cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": out.num_cached_tokens}
        if account.priced:
            usage["cost_usd"] = account.usd
        return usage


@dataclass
class Flight:
    """A request being served: its first output, the rest of its stream, its cost and its timings."""

    first: RequestOutput
    stream: AsyncIterator[RequestOutput]
    account: RequestAccount
    record: RequestRecord


async def _observed(
    stream: AsyncIterator[RequestOutput], account: RequestAccount, record: RequestRecord
) -> AsyncIterator[RequestOutput]:
    async for out in stream:
        account.update(out)
        record.output(out)
        yield out


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _guarded(
    events: AsyncIterator[str], record: RequestRecord | None = None, request_id: str = ""
) -> AsyncIterator[str]:
    """A failure after the stream started becomes an error event and the stream ends; it never hangs.
    A stream that ends any other way than finishing (the client left) counts as aborted."""
    outcome = "aborted"
    try:
        async for event in events:
            yield event
    except UNAVAILABLE as e:
        outcome = "error"
        logger.warning("request %s: stream ended, no engine could continue it: %r", request_id, e)
        yield _sse(
            error_body(
                f"no engine could continue this request; retry later (request id {request_id})",
                "server_error",
                code="service_unavailable",
            )
        )
        yield _sse("[DONE]")
    except Exception:
        outcome = "error"
        logger.exception("request %s: stream failed", request_id)
        yield _sse(internal_error_body(request_id))
        yield _sse("[DONE]")
    finally:
        if record is not None:
            record.finish(None, outcome)  # a no-op when the stream finished and counted itself


async def _deltas(first: RequestOutput, stream: AsyncIterator, hold: int):
    """(choice index, text delta, new token ids, new logprobs, finish_reason) as outputs arrive; `hold` chars
    stay back until a choice finishes, so a stop string split across tokens is never sent."""
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    done: set[int] = set()

    async def outputs():
        yield first
        if not first.finished:
            async for out in stream:
                yield out

    async for out in outputs():
        for c in out.outputs:
            if c.index in done:
                continue
            upto = len(c.text) if c.finished else max(len(c.text) - hold, sent_text.get(c.index, 0))
            text = c.text[sent_text.get(c.index, 0) : upto]
            tokens = c.token_ids[sent_tokens.get(c.index, 0) :]
            logprobs = c.logprobs[sent_tokens.get(c.index, 0) :] if c.logprobs is not None else None
            if not text and not tokens and not c.finished:
                continue
            sent_text[c.index], sent_tokens[c.index] = upto, len(c.token_ids)
            if c.finished:
                done.add(c.index)
            yield c.index, text, tokens, logprobs, c.finish_reason, out


def _completion_logprobs(
    tokenizer, tokens: list[int], logprobs: list[dict[int, float]] | None
) -> dict | None:
    if logprobs is None:
        return None
    texts = [_token_text(tokenizer, t) for t in tokens]
    return {
        "tokens": texts,
        "token_logprobs": [lp[t] for t, lp in zip(tokens, logprobs, strict=True)],
        "top_logprobs": [{_token_text(tokenizer, k): v for k, v in lp.items()} for lp in logprobs],
    }


def _chat_logprobs(
    tokenizer, tokens: list[int], logprobs: list[dict[int, float]] | None, top: int
) -> dict | None:
    if logprobs is None:
        return None
    content = []
    for t, lp in zip(tokens, logprobs, strict=True):
        alternatives = sorted(lp.items(), key=lambda kv: -kv[1])[:top]
        content.append(
            {
                "token": _token_text(tokenizer, t),
                "logprob": lp[t],
                "top_logprobs": [{"token": _token_text(tokenizer, k), "logprob": v} for k, v in alternatives],
            }
        )
    return {"content": content}


def build_frontend(
    llm: AsyncLLM,
    model_name: str,
    api_key: str | None = None,
    max_inflight: int = 256,
    slo_table: SLOTable = DEFAULT_SLO_TABLE,
    prices: dict[str, float] | None = None,
    default_pool: str = "engine",
    admission: AdmissionController | None = None,
    concurrency: ConcurrencyLimit | None = None,
    pools: Callable[[], Awaitable[list[dict]]] | None = None,
    app_metrics: Callable[[], Awaitable[bytes]] | None = None,
) -> FastAPI:
    """The HTTP app: /v1/completions, /v1/chat/completions, /v1/models, /v1/pools, /health, /metrics.

    `llm` is the engine client: AsyncLLM in this process, or the Ray pools' DisaggregatedClient.
    `prices`: $/hour per replica by pool (outputs that name no pool are `default_pool`'s); `admission`
    rejects what would miss its class's TTFT target; `concurrency` adapts the in-flight cap under max_inflight; `pools()` lists the pools for /v1/pools;
    `app_metrics()` renders /metrics for the whole app (default: this process's registry)."""
    app = FastAPI(title="Ridgeline", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit)  # outermost: nothing reads a body past the limit
    front = Frontend(
        llm,
        model_name,
        max_inflight,
        slo_table,
        PriceList(prices or {}),
        default_pool,
        admission,
        concurrency,
    )
    tokenizer = llm.tokenizer

    def _count_unserved(request: Request, outcome: str) -> None:
        if not getattr(request.state, "counted", False):  # ended before it was served
            request.state.counted = True
            count_outcome(model_name, getattr(request.state, "slo_name", "none"), outcome)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        _count_unserved(
            request, "rejected" if exc.status == 429 else "error" if exc.status >= 500 else "invalid"
        )
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _route_error(request: Request, exc: StarletteHTTPException):
        """Unknown paths and methods answer in OpenAI's error shape too."""
        _count_unserved(request, "invalid")
        body = error_body(
            f"{request.method} {request.url.path}: {exc.detail}",
            code="not_found" if exc.status_code == 404 else None,
        )
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        rid = getattr(request.state, "request_id", "unknown")
        logger.error("request %s failed", rid, exc_info=exc)
        _count_unserved(request, "error")
        return JSONResponse(internal_error_body(rid), status_code=500, headers={"x-request-id": rid})

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

    @app.get("/health")
    async def health():
        """200 while the engine serves; 503 when an in-process engine's loop died or stalled (the Ray pools'
        replicas answer Serve's own health checks, which replace them)."""
        check = getattr(llm, "check_health", None)
        if check is not None:
            try:
                check()
            except EngineDeadError as e:
                logger.error("health check failed: %r", e)
                return JSONResponse(
                    error_body("the engine is not serving", "server_error", code="engine_dead"),
                    status_code=503,
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
        front.check_model(req.model)
        try:
            params = req.sampling_params(default_max_tokens=16, logprobs=req.logprobs)
        except ValueError as e:
            raise HTTPError.bad_request(e) from None
        slo = front.slo_class(http, req.priority)
        rid, created = f"cmpl-{http.state.request_id}", now()
        flight = await front.start(http, rid, req.prompt, params, req.cache_salt, slo)
        first, stream, account = flight.first, flight.stream, flight.account
        base = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
        if not req.stream:
            out = await front.final(http, flight)
            if out is None:
                return Response(status_code=499)
            choices = [
                {
                    "index": c.index,
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                    "logprobs": _completion_logprobs(tokenizer, c.token_ids, c.logprobs),
                    **({"token_ids": c.token_ids} if req.return_token_ids else {}),
                }
                for c in out.outputs
            ]
            extra = {"prompt_token_ids": out.prompt_token_ids} if req.return_token_ids else {}
            return {**base, "choices": choices, "usage": front.usage(out, account), **extra}

        async def events():
            last = first
            async for index, text, tokens, logprobs, finish, out in _deltas(first, stream, _hold(params)):
                last = out
                choice = {
                    "index": index,
                    "text": text,
                    "finish_reason": finish,
                    "logprobs": _completion_logprobs(tokenizer, tokens, logprobs),
                }
                yield _sse({**base, "choices": [choice]})
            flight.record.finish(last, outcome_of(last))
            if req.stream_options and req.stream_options.include_usage:
                yield _sse({**base, "choices": [], "usage": front.usage(last, account)})
            yield _sse("[DONE]")

        return StreamingResponse(
            _guarded(events(), flight.record, http.state.request_id), media_type="text/event-stream"
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        req = await _parse(http, ChatCompletionRequest)
        front.check_model(req.model)
        top = req.top_logprobs or 0
        try:
            params = req.sampling_params(default_max_tokens=None, logprobs=top if req.logprobs else None)
            if req.max_completion_tokens:
                params.max_tokens = req.max_completion_tokens
            messages = [m.model_dump(exclude_none=True) for m in req.messages]
        except ValueError as e:
            raise HTTPError.bad_request(e) from None
        text = await asyncio.to_thread(_render_chat, tokenizer, messages)
        prompt = await front.tokenize(text, add_special_tokens=False)  # the template wrote them
        slo = front.slo_class(http, req.priority)
        rid, created = f"chatcmpl-{http.state.request_id}", now()
        flight = await front.start(http, rid, prompt, params, req.cache_salt, slo, operation="chat")
        first, stream, account = flight.first, flight.stream, flight.account
        base = {"id": rid, "created": created, "model": model_name}
        if not req.stream:
            out = await front.final(http, flight)
            if out is None:
                return Response(status_code=499)
            choices = [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                    "logprobs": _chat_logprobs(tokenizer, c.token_ids, c.logprobs, top),
                    **({"token_ids": c.token_ids} if req.return_token_ids else {}),
                }
                for c in out.outputs
            ]
            extra = {"prompt_token_ids": out.prompt_token_ids} if req.return_token_ids else {}
            return {
                **base,
                "object": "chat.completion",
                "choices": choices,
                "usage": front.usage(out, account),
                **extra,
            }

        async def events():
            chunk = {**base, "object": "chat.completion.chunk"}
            for i in range(params.n):
                yield _sse(
                    {
                        **chunk,
                        "choices": [
                            {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        ],
                    }
                )
            last = first
            async for index, text, tokens, logprobs, finish, out in _deltas(first, stream, _hold(params)):
                last = out
                choice = {
                    "index": index,
                    "delta": {"content": text} if text else {},
                    "finish_reason": finish,
                    "logprobs": _chat_logprobs(tokenizer, tokens, logprobs, top),
                }
                yield _sse({**chunk, "choices": [choice]})
            flight.record.finish(last, outcome_of(last))
            if req.stream_options and req.stream_options.include_usage:
                yield _sse({**chunk, "choices": [], "usage": front.usage(last, account)})
            yield _sse("[DONE]")

        return StreamingResponse(
            _guarded(events(), flight.record, http.state.request_id), media_type="text/event-stream"
        )

    return app


def _render_chat(tokenizer, messages: list[dict]) -> str:
    """The chat prompt's text; a template that refuses the conversation is the client's 400."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except (ValueError, TemplateError) as e:
        raise HTTPError(
            400, f"messages: the model's chat template refused them: {e}", param="messages"
        ) from None


def _hold(params) -> int:
    return max((len(s) for s in params.stop), default=1) - 1
