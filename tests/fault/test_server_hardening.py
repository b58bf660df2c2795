"""The served app (local Ray, 1 prefill + 1 decode replica) against a hostile client and under faults, each
a reproduction of a bug found against `ridgeline serve`: no listener off loopback and no gRPC port that
unpickles, request bodies cut at the limit in Serve's proxy, worker metrics behind the API key, a cancel
storm that leaves nothing held, a dead engine replaced by Serve, and admission that recovers after a
prefill worker is killed mid-traffic."""

import asyncio
import contextlib
import os
import pickle
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
from ray import serve
from ray_helpers import MODEL, POOL, app_config, pool_stats, wait_pools_idle

pytestmark = [pytest.mark.ray, pytest.mark.slow]

KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
APP = "hardened"
ENGINE = {"num_blocks": 256, "max_model_len": 512}


@pytest.fixture(scope="module")
def url(deploy, llama):
    pool = {**POOL, "engine": ENGINE}
    return deploy(
        APP,
        **app_config(
            llama,
            prefill=pool,
            decode=pool,
            api_key=KEY,
            kv_lease_s=2.0,
            expose_worker_addresses=True,
            admission=True,
        ),
    )


# first in the module: its own app comes and goes before the module's app is deployed
def test_a_dead_engine_fails_its_health_check_and_serve_replaces_it(deploy, llama):
    app = "fragile"
    base = deploy(
        app,
        **app_config(
            llama, mode="aggregated", decode={**POOL, "worker_cls": "fragile_workers:BreakableDecodeWorker"}
        ),
    )
    assert (
        httpx.post(
            f"{base}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=60
        ).status_code
        == 200
    )
    broken = serve.get_deployment_handle("DecodeWorker", app_name=app).break_engine.remote().result()
    r = httpx.post(
        f"{base}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=120
    )
    assert r.status_code in (200, 503), r.text  # migrated to the replacement, or told to retry
    if r.status_code == 503:
        assert "injected" not in r.text and "Traceback" not in r.text
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "Serve did not replace the replica whose engine died"
        try:
            names = set(pool_stats(app, "DecodeWorker", 1, timeout=5))
        except AssertionError:
            names = set()
        if names and broken not in names:
            break
        time.sleep(0.5)
    ok = httpx.post(
        f"{base}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=60
    )
    assert ok.status_code == 200, ok.text


def _post(url: str, body: dict, timeout: float = 60, **kwargs) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/completions", json={"model": MODEL, **body}, headers=AUTH, timeout=timeout, **kwargs
    )


def _workers(url: str) -> dict[str, dict]:
    r = httpx.get(f"{url}/v1/pools", headers=AUTH, timeout=30)
    return {p["name"]: p["workers"] for p in r.json()["data"]}


# ---------------------------------------------------------------- listening sockets, read from /proc


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _ip(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def _listening() -> dict[str, tuple[str, int]]:
    """socket inode -> (address, port) of every listening TCP socket."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                address, port = fields[1].split(":")
                out[fields[9]] = (_ip(address), int(port, 16))
    return out


def _listeners_of(pids: set[int]) -> list[tuple[int, str, str, int]]:
    """(pid, command line, address, port) of every listening socket these processes hold."""
    listening, out = _listening(), []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            inode = link.removeprefix("socket:[").removesuffix("]")
            if link.startswith("socket:[") and inode in listening:
                out.append((pid, cmdline.strip(), *listening[inode]))
    return out


def _loopback(address: str) -> bool:
    return (
        address.startswith("127.")
        or address in ("::1", "::ffff:127.0.0.1")
        or address.startswith("::ffff:127.")
    )


def test_no_listener_off_loopback_and_no_open_grpc_door(url, tmp_path):
    """Ray Serve gave every replica an inter-deployment gRPC server on [::] that unpickles request metadata
    before any check: anyone reaching it ran code in the replica, with no API key."""
    _post(url, {"prompt": "warm up", "max_tokens": 2})
    listeners = _listeners_of(_descendants(os.getpid()))
    assert listeners, "no listening sockets found under this test process"
    exposed = [(pid, cmd[:60], addr, port) for pid, cmd, addr, port in listeners if not _loopback(addr)]
    assert exposed == []

    import grpc
    from ray.serve.generated import serve_pb2

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    request = serve_pb2.ASGIRequest(pickled_request_metadata=pickle.dumps(Payload())).SerializeToString()
    replica_ports = {port for _, cmd, _, port in listeners if "ServeReplica" in cmd}
    assert replica_ports, "no Serve replica holds a listening socket: nothing was probed"
    for port in sorted(replica_ports):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                "/ray.serve.ASGIService/HandleRequest",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            with contextlib.suppress(grpc.RpcError):  # refused or unimplemented: what every port must answer
                call(request, timeout=3)
    assert not marker.exists(), "an unauthenticated gRPC pickle ran code in a replica"


def _proxy_rss_kb() -> tuple[int, int]:
    for pid in _descendants(os.getpid()):
        try:
            if b"ProxyActor" in Path(f"/proc/{pid}/cmdline").read_bytes():
                status = Path(f"/proc/{pid}/status").read_text()
                return pid, int(
                    next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]
                )
        except OSError:
            continue
    raise AssertionError("Serve's proxy process not found")


def test_a_chunked_oversize_body_is_cut_in_serves_proxy(url, ray_serve):
    """A chunked body with no Content-Length used to be read whole (256 MiB) by the proxy and the ingress."""
    pid, before = _proxy_rss_kb()
    host, port = ray_serve.removeprefix("http://").split(":")
    chunk = b"x" * 2**20
    head = (
        f"POST /{APP}/v1/completions HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    reply = b""
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head)
        try:
            for _ in range(256):  # 256 MiB offered
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed at the limit
        while b"\r\n\r\n" not in reply:
            got = sock.recv(65536)
            if not got:
                break
            reply += got
    assert reply.startswith(b"HTTP/1.1 413"), reply[:300]
    _, after = _proxy_rss_kb()
    assert after - before < 64 * 1024, f"proxy {pid} grew {(after - before) / 1024:.0f} MiB"
    assert _post(url, {"prompt": "still here", "max_tokens": 2}).status_code == 200


def test_worker_metrics_need_the_key_and_pools_hide_addresses_unless_asked(url, deploy, llama):
    workers = [w for ws in _workers(url).values() for w in ws]
    assert workers and all(w.get("metrics_url") for w in workers)
    for w in workers:
        assert httpx.get(w["metrics_url"], timeout=10).status_code == 401
        assert (
            httpx.get(w["metrics_url"], headers={"Authorization": "Bearer wrong"}, timeout=10).status_code
            == 401
        )
        scraped = httpx.get(w["metrics_url"], headers=AUTH, timeout=10)
        assert scraped.status_code == 200 and "ridgeline_" in scraped.text
    merged = httpx.get(f"{url}/metrics", headers=AUTH, timeout=30).text  # the frontend still gathers them
    assert "replica=" in merged


# this module's app runs admission control (for the test after this one); the storm test is about what a
# cancel leaves behind, so its requests ask for the batch class (a 60 s TTFT target), which a busy CI machine
# does not make admission shed (a standard request once got a 429 here under load)
BATCH = {"x-slo-class": "batch"}


def test_a_cancel_storm_leaves_no_lease_block_or_hung_request(url):
    """Long prompts running while 40 requests are abandoned 20-400 ms after sending: the engine thread used
    to die on a cancelled future, leaving /health green, every later request hung and 633 blocks leased."""

    async def storm():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as client:
            long = [
                asyncio.create_task(
                    client.post(
                        f"{url}/v1/completions",
                        json={"model": MODEL, "prompt": [20 + i] * 200, "max_tokens": 48, "ignore_eos": True},
                        headers=BATCH,
                    )
                )
                for i in range(4)
            ]
            abandoned = []
            for i in range(40):
                body = {"model": MODEL, "prompt": [30 + i] * 120, "max_tokens": 32, "stream": i % 2 == 0}
                abandoned.append(
                    asyncio.create_task(
                        asyncio.wait_for(
                            client.post(f"{url}/v1/completions", json=body), timeout=0.02 + 0.01 * (i % 39)
                        )
                    )
                )
                await asyncio.sleep(0.01)
            await asyncio.gather(*abandoned, return_exceptions=True)
            return await asyncio.gather(*long)

    finished = asyncio.run(storm())
    assert [r.status_code for r in finished] == [200] * 4
    stats = wait_pools_idle(APP, {"PrefillWorker": 1, "DecodeWorker": 1}, timeout=60)
    prefill = next(iter(stats["PrefillWorker"].values()))
    assert prefill["held_leases"] == 0 and prefill["kv_free_blocks"] == prefill["kv_total_blocks"]
    for _ in range(3):
        after = httpx.post(
            f"{url}/v1/completions",
            json={"model": MODEL, "prompt": "after the storm", "max_tokens": 4},
            headers={**AUTH, **BATCH},
            timeout=30,
        )
        assert after.status_code == 200, after.text


def test_admission_recovers_after_a_prefill_worker_is_killed(url):
    """SIGKILL the prefill worker, send one request (it waits through the restart), then normal traffic:
    the drain rate measured from that one request used to refuse interactive and standard for good."""
    victim = _workers(url)["prefill"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    slow = _post(url, {"prompt": [9] * 200, "max_tokens": 2}, timeout=120)
    assert slow.status_code in (200, 503), slow.text
    deadline, streak, statuses = time.monotonic() + 60, 0, []
    while streak < 5:
        assert time.monotonic() < deadline, f"admission did not recover within 60 s: {statuses[-30:]}"
        for cls in ("interactive", "standard"):
            r = httpx.post(
                f"{url}/v1/completions",
                headers={**AUTH, "x-slo-class": cls},
                timeout=60,
                json={"model": MODEL, "prompt": [7] * 32, "max_tokens": 2},
            )
            statuses.append(r.status_code)
            streak = streak + 1 if r.status_code == 200 else 0
        time.sleep(0.2)
    print(f"admission recovered after {len(statuses)} probes: {statuses}")
