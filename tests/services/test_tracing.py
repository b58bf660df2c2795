"""Traces: one request yields one connected trace across every role it touched, under the client's trace
id. In process with an in-memory exporter, and across the Ray app's processes through real OTLP/HTTP
export to a receiver on 127.0.0.1."""

import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from ray_helpers import MODEL, app_config
from serving_helpers import http_server

from engine.async_llm import AsyncLLM
from observability import tracing
from services.frontend import build_frontend
from services.openai_serving import OpenAIServing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"


def test_in_process_the_request_span_continues_the_client_trace(llama):
    exporter = InMemorySpanExporter()
    if not tracing.configure("ridgeline-test", exporter=exporter):
        pytest.fail("tracing could not be configured")
    llm = AsyncLLM.from_pretrained(llama, num_blocks=64)
    try:
        with http_server(build_frontend(OpenAIServing(llm, MODEL))) as url:
            r = httpx.post(
                f"{url}/v1/completions",
                headers={"traceparent": TRACEPARENT},
                timeout=60,
                json={
                    "model": MODEL,
                    "prompt": "hello",
                    "max_tokens": 5,
                    "ignore_eos": True,
                    "user": "alice",
                },
            )
            untraced = httpx.post(
                f"{url}/v1/completions", timeout=60, json={"model": MODEL, "prompt": "hi", "max_tokens": 2}
            )
    finally:
        llm.shutdown()
        exporter.shutdown()  # later tests in this process record nothing more into it
    assert r.status_code == untraced.status_code == 200
    spans = [s for s in exporter.get_finished_spans() if format(s.context.trace_id, "032x") == TRACE_ID]
    ours = [s for s in spans if s.name == f"text_completion {MODEL}"]  # (FastAPI adds its own spans too)
    assert len(ours) == 1
    span = ours[0]
    assert format(span.parent.span_id, "016x") == CLIENT_SPAN and span.parent.is_remote
    attrs = span.attributes
    assert attrs["gen_ai.request.model"] == MODEL and attrs["gen_ai.operation.name"] == "text_completion"
    assert (
        attrs["gen_ai.usage.output_tokens"] == 5
        and attrs["gen_ai.usage.input_tokens"] == r.json()["usage"]["prompt_tokens"]
    )
    assert attrs["gen_ai.response.id"] == r.json()["id"] and attrs["ridgeline.slo_class"] == "standard"
    assert attrs["user.id"] == "alice"  # the request's `user` field
    # a request without traceparent starts its own trace
    others = [
        s
        for s in exporter.get_finished_spans()
        if (s.attributes or {}).get("gen_ai.response.id") == untraced.json()["id"]
    ]
    assert len(others) == 1 and others[0].parent is None


class _Receiver(BaseHTTPRequestHandler):
    spans: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            service = next(
                a.value.string_value for a in resource.resource.attributes if a.key == "service.name"
            )
            for scope in resource.scope_spans:
                for s in scope.spans:
                    _Receiver.spans.append(
                        {
                            "service": service,
                            "name": s.name,
                            "trace": s.trace_id.hex(),
                            "id": s.span_id.hex(),
                            "parent": s.parent_span_id.hex(),
                            "attrs": {a.key: a.value for a in s.attributes},
                        }
                    )
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.mark.ray
def test_one_request_is_one_connected_trace_across_the_app_over_otlp(deploy, llama):
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.server_port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    try:
        url = deploy("traced", **app_config(llama, kv_transport="nixl", env=env))
        r = httpx.post(
            f"{url}/v1/completions",
            headers={"traceparent": TRACEPARENT},
            timeout=60,
            json={"model": MODEL, "prompt": list(range(5, 45)), "max_tokens": 6, "ignore_eos": True},
        )
        assert r.status_code == 200, r.text
        wanted = {
            ("ridgeline-frontend", f"text_completion {MODEL}"),
            ("ridgeline-frontend", "prefill"),
            ("ridgeline-frontend", "decode"),
            ("ridgeline-frontend", "route"),
            ("ridgeline-prefill", "prefill"),
            ("ridgeline-prefill", "queue"),
            ("ridgeline-decode", "decode"),
            ("ridgeline-decode", "kv_transfer"),
            ("ridgeline-decode", "queue"),
        }
        deadline = time.monotonic() + 30
        while True:
            spans = [s for s in _Receiver.spans if s["trace"] == TRACE_ID]
            if wanted <= {(s["service"], s["name"]) for s in spans} and len(spans) >= 11:
                break
            assert time.monotonic() < deadline, (
                f"spans so far: {sorted((s['service'], s['name']) for s in spans)}"
            )
            time.sleep(0.2)
    finally:
        receiver.shutdown()
    ids = {s["id"] for s in spans}
    assert all(s["parent"] in ids or s["parent"] == CLIENT_SPAN for s in spans), spans  # one connected tree
    root = [s for s in spans if s["name"] == f"text_completion {MODEL}"]
    assert len(root) == 1 and root[0]["parent"] == CLIENT_SPAN
    by_id = {s["id"]: s for s in spans}
    for s in spans:  # workers' spans hang under the frontend's call spans; routing under each call
        if s["service"] != "ridgeline-frontend" and s["name"] in ("prefill", "decode"):
            assert (
                by_id[s["parent"]]["service"] == "ridgeline-frontend"
                and by_id[s["parent"]]["name"] == s["name"]
            )
        if s["name"] == "route":
            assert by_id[s["parent"]]["name"] in ("prefill", "decode")
    assert root[0]["attrs"]["gen_ai.usage.output_tokens"].int_value == 6
