"""The registry's two backends against the same contract, and membership (leases kept alive, views that
follow) against a real etcd server on 127.0.0.1: a killed process leaves within its TTL; an etcd restart
keeps the last known state and workers register again."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from control_plane.membership import Registration, RegistryView
from control_plane.registry import RegistryUnavailable, keys, parse_url
from control_plane.registry_etcd import open_registry
from control_plane.registry_memory import MemoryRegistry

ROOT = Path(__file__).resolve().parents[2]


def wait_until(predicate, timeout_s: float, what: str) -> float:
    """Seconds it took; AssertionError naming `what` after timeout_s."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, f"{what}: not within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture(params=["memory", "etcd"])
def make_registry(request):
    if request.param == "memory":
        shared = MemoryRegistry()
        return lambda: shared
    etcd = request.getfixturevalue("etcd")
    return lambda: open_registry(etcd.url)


def test_leases_keys_and_watches_follow_one_contract(make_registry):
    async def main():
        reg = make_registry()
        prefix = f"/ridgeline/t{time.monotonic_ns()}/"
        _, rev = await reg.get_prefix(prefix)
        events = []

        async def follow():
            async for e in reg.watch(prefix, rev + 1):
                events.append((e.kind, e.key.removeprefix(prefix)))

        watcher = asyncio.create_task(follow())
        lease = await reg.grant(2)
        await reg.put(prefix + "kept", {"a": 1}, lease=lease)
        await reg.put(prefix + "lapses", {"b": 2}, lease=await reg.grant(2))
        await reg.put(prefix + "plain", {"c": 3})
        items, _ = await reg.get_prefix(prefix)
        assert items == {prefix + "kept": {"a": 1}, prefix + "lapses": {"b": 2}, prefix + "plain": {"c": 3}}
        for _ in range(8):  # 4 s: twice the TTL; the refreshed key stays, the other lapses
            await asyncio.sleep(0.5)
            assert await reg.refresh(lease)
        items, _ = await reg.get_prefix(prefix)
        assert set(items) == {prefix + "kept", prefix + "plain"}
        await reg.revoke(lease)
        assert not await reg.refresh(lease)
        await reg.delete(prefix + "plain")
        assert (await reg.get_prefix(prefix))[0] == {}
        for _ in range(40):
            if len(events) >= 6:
                break
            await asyncio.sleep(0.05)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        assert events == [
            ("put", "kept"),
            ("put", "lapses"),
            ("put", "plain"),
            ("delete", "lapses"),
            ("delete", "kept"),
            ("delete", "plain"),
        ]
        await reg.close()

    asyncio.run(main())


def test_memory_registry_names_bad_leases_and_lost_history():
    async def main():
        reg = MemoryRegistry(history=4)
        with pytest.raises(ValueError, match="lease"):
            await reg.put("/k", {}, lease=99)
        with pytest.raises(ValueError, match="ttl_s"):
            await reg.grant(0)
        for i in range(6):
            await reg.put(f"/k{i}", {"i": i})
        with pytest.raises(RegistryUnavailable, match="list again"):
            await reg.events_since("/", 2, timeout_s=0.1)
        events, next_rev = await reg.events_since("/", reg.revision, timeout_s=0.1)
        assert [e.key for e in events] == ["/k5"] and next_rev == reg.revision + 1

    asyncio.run(main())


@pytest.mark.parametrize(
    "url, message",
    [
        ("etcd://", "registry"),
        ("redis://127.0.0.1:6379", "allowed 'embedded'"),
        ("etcd://127.0.0.1:99999", "port"),
    ],
)
def test_bad_registry_urls_are_named(url, message):
    with pytest.raises(ValueError, match=message):
        parse_url(url)
    assert parse_url("etcd://10.0.0.1") == ("etcd", "10.0.0.1", 2379)


_WORKER = textwrap.dedent("""
    import sys, time
    from control_plane.membership import Registration
    from control_plane.registry_etcd import open_registry
    reg = Registration(lambda: open_registry(sys.argv[1]), sys.argv[2], {"pid": 0}, ttl_s=2)
    reg.start()
    while not reg.registered:
        time.sleep(0.02)
    print("registered", flush=True)
    time.sleep(60)
""")


def test_a_killed_process_leaves_the_registry_within_its_ttl(etcd):
    prefix = keys.workers("killtest")
    view = RegistryView(lambda: open_registry(etcd.url), prefix, resync_s=2)
    view.start()
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER, etcd.url, keys.worker("killtest", "decode", "w1")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout.readline().strip() == "registered"
        wait_until(lambda: "decode/w1" in view.under(""), 5, "the view sees the worker")
        os.kill(proc.pid, signal.SIGKILL)  # no revoke, no goodbye: only the lease can tell
        proc.wait(5)
        gone = wait_until(lambda: "decode/w1" not in view.under(""), 2 + 3, "the killed worker leaves")
        print(f"killed worker left the view {gone:.2f} s after SIGKILL (TTL 2 s)")
    finally:
        proc.kill()
        view.stop()


def test_etcd_restart_keeps_the_last_state_and_workers_register_again(etcd):
    prefix = keys.app("restart")
    calls = []
    reg = Registration(
        lambda: open_registry(etcd.url),
        keys.worker("restart", "decode", "w1"),
        {"role": "decode"},
        ttl_s=2,
        on_registered=lambda: calls.append(time.monotonic()),
    )
    view = RegistryView(lambda: open_registry(etcd.url), prefix, resync_s=2)
    reg.start()
    view.start()
    try:
        wait_until(lambda: "workers/decode/w1" in view.under(""), 5, "registered")
        before = view.under("")["workers/decode/w1"]
        etcd.stop()
        wait_until(lambda: not view.connected, 5, "the view notices etcd is gone")
        time.sleep(3)  # longer than the TTL: the last known state is all there is
        assert "workers/decode/w1" in view.under("")
        etcd.start(wipe=True)  # came back empty: every registration must be made again
        wait_until(
            lambda: view.connected and view.under("").get("workers/decode/w1", before) != before,
            10,
            "re-registered under a new lease",
        )
        assert reg.registrations == len(calls) >= 2 and reg.errors >= 1
    finally:
        reg.stop()
        view.stop()
        if etcd.proc is None:
            etcd.start()
