"""The generation path the OpenAI endpoints share (vLLM's OpenAIServing): requests in flight by SLO class,
admission, tokenizing off the event loop, the first output before any byte of the response (so bad input
and overload are proper HTTP errors), then the whole response or its SSE stream. Every outcome is counted
once and every engine second priced (services/accounting.py).

Every error a client can cause is an OpenAI error body: 400 bad input (the param named), 404 unknown model,
429 + Retry-After when the request's SLO class cannot meet its TTFT target (control_plane/admission.py) or
the requests in flight fill what its class may use, 503 + Retry-After when no engine can serve. A server-side
failure is a 500 or 503 whose body names the request id and nothing internal; the traceback goes to the log
under that id.
"""

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from control_plane.admission import AdmissionController, AdmitEverything, Overloaded, Ticket
from control_plane.concurrency_limit import ConcurrencyLimit, FixedLimit
from control_plane.cost import PriceList
from control_plane.slo import DEFAULT_SLO_TABLE, SLOClass, SLOTable
from engine.async_llm import EngineDeadError
from engine.documents import DocumentSpan
from engine.outputs import RequestOutput
from engine.protocol import EngineClient
from engine.sampling_params import MAX_LOGPROBS, SamplingParams
from observability import tracing
from observability.metrics import ADMISSION_REJECTED
from services.accounting import RequestAccount
from services.openai_protocol import error_body
from services.openai_render import Renderer
from services.request_metrics import RequestRecord, outcome_of
from services.streams import merge
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
        """400 for bad input: a ParameterError (engine/errors.py) names its parameter."""
        return cls(400, str(error), param=getattr(error, "parameter", None))

    @classmethod
    def internal(cls, http: Request, error: BaseException) -> "HTTPError":
        """500 for a server bug: the traceback goes to the log under the request id, the client gets the id.
        Answered here, not by the app's last-resort handler, so the connection stays usable."""
        rid = http.state.request_id
        logger.error("request %s failed", rid, exc_info=error)
        return cls(
            500,
            INTERNAL_ERROR.format(rid),
            type_="server_error",
            code="internal_error",
            headers={"x-request-id": rid},
        )

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


INTERNAL_ERROR = "internal server error (request id {}); the server log has the cause"


def internal_error_body(request_id: str) -> dict:
    return error_body(INTERNAL_ERROR.format(request_id), "server_error", code="internal_error")


@dataclass
class Generation:
    """What an endpoint asks of the shared path once its request is parsed and checked. Several prompts
    (a completions batch) run as one engine request each; prompt k's choices are k*n .. k*n+n-1."""

    prompts: list[str | list[int]]
    params: SamplingParams
    cache_salt: str | None
    slo: SLOClass
    operation: str  # "text_completion" | "chat" (the GenAI span's operation)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    user: str | None = None  # the client's end-user id, recorded on the trace span
    # RAG (services/documents.py): per prompt, its document segments (token ids only); which of their tokens
    # are recomputed (DocumentRecompute's fields given; the pool's setting for the rest)
    documents: list[tuple[DocumentSpan, ...]] | None = None
    document_recompute: dict | None = None

    def document_options(self, prompt: int) -> dict:
        """EngineClient.generate's document arguments for prompt k (none without documents)."""
        if not self.documents or not self.documents[prompt]:
            return {}
        return {"documents": self.documents[prompt], "document_recompute": self.document_recompute}


class OpenAIServing:
    """The generation path both endpoints share: slots and admission by SLO class, tokenizing, the first
    output before any byte of the response, then the response whole or streamed (openai_render.py shapes
    it), every outcome counted and every token priced."""

    def __init__(
        self,
        llm: EngineClient,
        model_name: str,
        max_inflight: int = 256,
        slo_table: SLOTable = DEFAULT_SLO_TABLE,
        prices: PriceList | dict[str, float] | None = None,
        default_pool: str = "engine",
        admission: AdmissionController | AdmitEverything | None = None,
        concurrency: ConcurrencyLimit | FixedLimit | None = None,
        max_logprobs: int = MAX_LOGPROBS,
    ):
        self.slo_table = slo_table
        self.max_logprobs = max_logprobs  # the engines' cap (--max-logprobs), checked before admission
        self.llm = llm
        self.model_name = model_name
        self.max_inflight = max_inflight
        self.prices = prices if isinstance(prices, PriceList) else PriceList(prices or {})
        self.default_pool = default_pool
        self.admission = admission or AdmitEverything()
        self.inflight = 0  # requests between their slot and their end (this frontend's own count: no await)
        # the cap found under load (control_plane/concurrency_limit.py), or max_inflight as configured
        self.concurrency = concurrency or FixedLimit(max_inflight)

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
            raise HTTPError.bad_request(e) from None
        http.state.slo_name = slo.name
        return slo

    def _take_slot(self, slo: SLOClass) -> tuple[float, int]:
        """Count a request in flight, or refuse it (429: overload is the client's to retry) when the requests
        in flight fill what its class may use (SLOTable.inflight_limit) of the cap: the adaptive limit when
        there is one, never above max_inflight. Returns (when, how many were in flight before it)."""
        if (late := self.admission.most_overdue()) is not None:  # already late: no need to wait for it
            self.concurrency.observe(
                time.monotonic() - late.admitted_at, late.slo.ttft_ms / 1000, late.admitted_at, 0
            )
        cap = min(self.max_inflight, self.concurrency.value)
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

    def _admit(self, slo: SLOClass, prompt_ids: list[int]) -> Ticket:
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

    def check_logprobs(self, logprobs: int | None, param: str) -> None:
        if logprobs is not None and logprobs > self.max_logprobs:
            raise HTTPError(
                400, f"{param}: got {logprobs}, at most {self.max_logprobs} (max_logprobs)", param=param
            )

    def check_context(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """400 before admission when the prompt, or the prompt with max_tokens, cannot fit the context:
        waiting would never help (vLLM's message)."""
        limit, n = self.llm.max_model_len, len(prompt_ids)
        if n >= limit:
            raise HTTPError(
                400,
                f"prompt: {n} tokens, but this model's context holds {limit} including at least one "
                "generated token",
                param="prompt",
            )
        if params.max_tokens is not None and n + params.max_tokens > limit:
            raise HTTPError(
                400,
                f"max_tokens: this model's maximum context length is {limit} tokens; you requested "
                f"{n + params.max_tokens} ({n} in the prompt, {params.max_tokens} for the completion)",
                param="max_tokens",
            )

    def _span(self, http: Request, operation: str, request_id: str, params, user: str | None = None):
        """The request's SERVER span, a child of the client's traceparent when it sent one."""
        extra = {"user.id": user} if user else {}
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
                **extra,
            },
        )

    async def start(
        self, http: Request, request_id: str, prompt: str | list[int], gen: Generation, index: int = 0
    ) -> "Flight":
        """The first output of one prompt's request: bad input and admission surface here, before any byte
        of the response. The flight's stream is accounted (cost) and timed (metrics) as it is consumed."""
        params, slo = gen.params, gen.slo
        if not prompt:
            raise HTTPError(400, "prompt: must not be empty", param="prompt")
        taken_at, inflight_before = self._take_slot(slo)
        try:
            prompt_ids = await self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
            self.check_context(prompt_ids, params)
            ticket = self._admit(slo, prompt_ids)
        except BaseException:
            self._free_slot()
            raise
        account = RequestAccount(self.prices, self.model_name, slo.name, self.default_pool)
        span = self._span(http, gen.operation, request_id, params, gen.user)
        record = RequestRecord(
            self.model_name,
            slo,
            http.state.received,
            span,
            on_finish=self._free_slot,
            request_id=request_id,
            pool=self.default_pool,
        )
        stream = self.llm.generate(
            request_id,
            prompt_ids,
            params,
            cache_salt=gen.cache_salt,
            priority=slo.priority,
            preemptible=slo.preemptible,
            slo_class=slo.name,
            trace_context=tracing.inject(span),
            **gen.document_options(index),
        )
        try:
            first = await anext(stream)
        except BaseException as e:
            self.admission.cancel(ticket)  # nothing will come: it leaves the queue without draining it
            http.state.counted = True
            record.finish(None, "invalid" if isinstance(e, ValueError) else "error")
            if isinstance(e, ValueError):
                raise HTTPError.bad_request(e) from None
            if isinstance(e, UNAVAILABLE):
                raise HTTPError.unavailable(http, e) from None
            if isinstance(e, Exception):
                raise HTTPError.internal(http, e) from None
            raise
        self.admission.first_token(ticket)
        self.concurrency.observe(time.monotonic() - taken_at, slo.ttft_ms / 1000, taken_at, inflight_before)
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
                except Exception as e:
                    record.finish(None, "error")
                    http.state.counted = True
                    raise HTTPError.internal(http, e) from None
                record.finish(out, outcome_of(out))
                return out
            if await http.is_disconnected():
                task.cancel()  # the stream's cleanup aborts the request
                await asyncio.gather(task, return_exceptions=True)
                record.finish(None, "aborted")
                return None

    def usage(self, outs: list[RequestOutput], flights: list["Flight"]) -> dict:
        prompt = sum(len(out.prompt_token_ids) for out in outs)
        completion = sum(len(c.token_ids) for out in outs for c in out.outputs)
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        if cached := sum(out.num_cached_tokens for out in outs):
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        if any(f.account.priced for f in flights):
            usage["cost_usd"] = sum(f.account.usd for f in flights)
        return usage

    async def respond(self, http: Request, request_id: str, gen: Generation, renderer: Renderer):
        """The request served: a JSON body, a 499 when the client left, or an SSE stream that always ends
        with [DONE] (an error event first when something failed after it started)."""
        flights = await self._start_all(http, request_id, gen)
        if not gen.stream:
            outs = await asyncio.gather(*(self.final(http, f) for f in flights))
            if any(out is None for out in outs):
                return Response(status_code=499)
            done = [out for out in outs if out is not None]
            return renderer.response(_batched(done, gen.params.n), self.usage(done, flights))
        events = self._events(flights, gen, renderer)
        records = [f.record for f in flights]
        return StreamingResponse(
            _guarded(events, records, http.state.request_id), media_type="text/event-stream"
        )

    async def _start_all(self, http: Request, request_id: str, gen: Generation) -> list["Flight"]:
        """One flight per prompt; when one cannot start, those already started are aborted."""
        if len(gen.prompts) == 1:
            return [await self.start(http, request_id, gen.prompts[0], gen)]
        flights: list[Flight] = []
        try:
            for k, prompt in enumerate(gen.prompts):
                flights.append(await self.start(http, f"{request_id}-{k}", prompt, gen, k))
        except BaseException:
            for flight in flights:
                await flight.close()
            raise
        return flights

    async def _events(
        self, flights: list["Flight"], gen: Generation, renderer: Renderer
    ) -> AsyncIterator[str]:
        n = gen.params.n
        for chunk in renderer.opening(n * len(flights)):
            yield _sse(chunk)
        last = [f.first for f in flights]
        deltas = [_deltas(f.first, f.stream, _hold(gen.params)) for f in flights]
        async for k, (index, text, tokens, logprobs, finish, out) in merge(deltas):
            last[k] = out
            for chunk in renderer.chunks(k * n + index, text, tokens, logprobs, finish):
                yield _sse(chunk)
        for flight, out in zip(flights, last, strict=True):
            flight.record.finish(out, outcome_of(out))
        if gen.include_usage:
            yield _sse(renderer.usage_chunk(self.usage(last, flights)))
        yield _sse("[DONE]")


@dataclass
class Flight:
    """A request being served: its first output, the rest of its stream, its cost and its timings."""

    first: RequestOutput
    stream: AsyncIterator[RequestOutput]
    account: RequestAccount
    record: RequestRecord

    async def close(self) -> None:
        """Abort it (closing the engine stream aborts the request) and count it aborted."""
        await self.stream.aclose()  # type: ignore[attr-defined]  # an async generator
        self.record.finish(None, "aborted")


def _batched(outs: list[RequestOutput], n: int) -> RequestOutput:
    """One output for a batch of prompts: prompt k's choices renumbered k*n + index."""
    if len(outs) == 1:
        return outs[0]
    choices = [
        dataclasses.replace(c, index=k * n + c.index) for k, out in enumerate(outs) for c in out.outputs
    ]
    return dataclasses.replace(outs[0], outputs=choices, prompt_token_ids=[])


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
    events: AsyncIterator[str], records: list[RequestRecord] | None = None, request_id: str = ""
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
        for record in records or []:
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


def _hold(params) -> int:
    return max((len(s) for s in params.stops), default=1) - 1
