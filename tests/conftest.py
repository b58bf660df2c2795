import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; it must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.envs import local_cluster_env  # noqa: E402 - after TRITON_INTERPRET: engine imports triton

# Ray on 127.0.0.1 only, NIXL over loopback, Serve's proxy behind the body limits: what `ridgeline serve` sets.
# Before any test module imports ray: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at import, and with it unset
# binds every interface.
os.environ.update(local_cluster_env())

ON_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA is; on CPU they are deselected (reported), never silently passed. Modules
    on the session's Ray run last, each kept whole and in order: the others then run with no Ray idling beside
    them on this 2-core machine."""
    if not ON_GPU:
        gpu = [item for item in items if "gpu" in item.keywords]
        if gpu:
            config.hook.pytest_deselected(items=gpu)
            items[:] = [item for item in items if "gpu" not in item.keywords]
    on_ray = {item.getparent(pytest.Module) for item in items if "ray_serve" in item.fixturenames}
    items.sort(key=lambda item: item.getparent(pytest.Module) in on_ray)  # stable: each group keeps its order


# -- early runs: a module's independent subprocesses, run ahead of its tests -------------------------------
# A test module may name EARLY_RUNS = {name: fn(tmp_path_factory) -> result}: commands that depend on nothing
# else in the session. They start with the first kernel test, one after another in a background thread: the
# kernel tests (Triton's interpreter, timed by nothing) keep one of this machine's 2 cores busy and leave the
# other idle. A test takes its run's result with early_run(name); run alone, the module's runs start then.

EARLY_RUNS_WITH = Path(__file__).parent / "kernels"


class _EarlyRuns:
    def __init__(self, tmp_path_factory):
        from concurrent.futures import ThreadPoolExecutor

        self.tmp_path_factory = tmp_path_factory
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="early-run")
        self.futures: dict[tuple[str, str], object] = {}
        self.ahead = False  # the session's runs were started, with the first kernel test

    def start(self, module) -> None:
        for name, fn in getattr(module, "EARLY_RUNS", {}).items():
            key = (module.__name__, name)
            if key not in self.futures:
                self.futures[key] = self.pool.submit(fn, self.tmp_path_factory)

    def result(self, module, name: str):
        self.start(module)
        return self.futures[(module.__name__, name)].result(timeout=900)  # each run bounds its commands

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


_EARLY_RUNS = pytest.StashKey[_EarlyRuns]()


def _early_runs(config) -> _EarlyRuns:
    if _EARLY_RUNS not in config.stash:
        config.stash[_EARLY_RUNS] = _EarlyRuns(config._tmp_path_factory)
    return config.stash[_EARLY_RUNS]


def pytest_runtest_setup(item):
    runs = _early_runs(item.config)
    if not runs.ahead and item.path.is_relative_to(EARLY_RUNS_WITH):
        runs.ahead = True
        for module in dict.fromkeys(getattr(other, "module", None) for other in item.session.items):
            if module is not None:
                runs.start(module)


def pytest_sessionfinish(session):
    runs = session.config.stash.get(_EARLY_RUNS, None)
    if runs is not None:
        runs.close()


@pytest.fixture
def early_run(request):
    """early_run(name) -> the result of this module's EARLY_RUNS[name], run ahead or now."""
    runs = _early_runs(request.config)
    return lambda name: runs.result(request.module, name)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch, **overrides) -> path of a checkpoint built once per session."""
    from engine.tiny_model import make_tiny_model

    made: dict[tuple, str] = {}

    def get(arch: str = "llama", **overrides) -> str:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            made[key] = str(make_tiny_model(out, arch, **overrides))
        return made[key]

    return get


@pytest.fixture(scope="session")
def llama(tiny_model):
    return tiny_model("llama")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_serve(stop_in_background):
    """A local Ray cluster on 127.0.0.1 with Serve's HTTP proxy on a free port; yields the base URL."""
    stop_in_background.wait()  # a cluster still shutting down would be joined, not a new one started
    # Ray workers import test helper modules (actors defined in tests) from here
    helpers = str(Path(__file__).parent / "services")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (helpers, os.environ.get("PYTHONPATH")) if p)
    import ray
    from ray import serve

    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


class _Deployer:
    """deploy(name, **ServeConfig fields) -> base URL of the app, served under /name. An app deployed while a
    test runs is deleted when that test ends; one deployed by a module-scoped fixture, when the module ends
    (apps left running would load this 2-core machine for the rest of the suite)."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.module_apps: list[str] = []

    def __call__(self, name: str, **config) -> str:
        return self.many({name: config})[name]

    def many(self, configs: dict[str, dict]) -> dict[str, str]:
        """deploy.many({name: ServeConfig fields}) -> {name: base URL}: the apps deployed at once (their
        replicas start side by side, not one app after the other), each running when this returns."""
        from ray import serve

        from services.app import ServeConfig, build_app

        serve.run_many(
            [
                serve.RunTarget(build_app(ServeConfig(**config)), name=name, route_prefix=f"/{name}")
                for name, config in configs.items()
            ]
        )
        (_TEST_APPS[-1] if _TEST_APPS else self.module_apps).extend(configs)
        return {name: f"{self.base_url}/{name}" for name in configs}


# the running test's apps: set while a test and its function-scoped fixtures run, empty between tests (when
# module-scoped fixtures are set up and torn down)
_TEST_APPS: list[list[str]] = []


def _delete_apps(names: list[str]) -> None:
    """Deleted in the background: a replica's graceful shutdown is seconds of waiting, not work."""
    if names:
        from ray import serve

        for name in names:
            serve.delete(name, _blocking=False)


@pytest.fixture(autouse=True)
def _delete_the_apps_a_test_deployed():
    # autouse function-scoped: set up after every module-scoped fixture, torn down after the test's others
    _TEST_APPS.append([])
    yield
    _delete_apps(_TEST_APPS.pop())


@pytest.fixture(scope="module")
def deploy(ray_serve):
    deployer = _Deployer(ray_serve)
    yield deployer
    _delete_apps(deployer.module_apps)


class _BackgroundStops:
    """stop(proc): SIGINT to a server subprocess (started with start_new_session=True) that no test waits on
    any longer; the tests go on while its Ray cluster shuts down (mostly waiting). wait(): until every such
    process is gone (60 s each, then SIGKILL to its process group): before anything here starts Ray, since
    ray.init() with no address joins a cluster still running on this machine, and at the session's end."""

    def __init__(self):
        self.procs: list = []

    def __call__(self, proc) -> None:
        import signal

        proc.send_signal(signal.SIGINT)
        self.procs.append(proc)

    def wait(self) -> None:
        import signal
        import subprocess

        while self.procs:
            proc = self.procs.pop()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture(scope="session")
def stop_in_background():
    stops = _BackgroundStops()
    yield stops
    stops.wait()


class EtcdServer:
    """A real etcd on 127.0.0.1 (Debian etcd-server), with a temporary data directory."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.port, self.peer_port = _free_port(), _free_port()
        self.url = f"etcd://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, wipe: bool = False) -> None:
        import shutil
        import subprocess
        import time

        if wipe:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        client, peer = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer_port}"
        self.proc = subprocess.Popen(
            [
                "etcd",
                "--name",
                "test",
                "--data-dir",
                str(self.data_dir),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"test={peer}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.data_dir.parent / "etcd.log", "ab"),  # noqa: SIM115 - the child holds it
        )
        deadline = time.monotonic() + 30
        import socket

        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "etcd exited; see etcd.log"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError("etcd did not start listening within 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="session")
def etcd(tmp_path_factory):
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data")
    server.start()
    yield server
    server.stop()
