"""The dashboards are what the generator makes, the rules pass promtool, and every metric follows
Prometheus naming conventions."""

import re
import subprocess
from pathlib import Path

import observability.aggregate  # noqa: F401 - registers its metric
from observability import metrics, worker_metrics
from observability.grafana import dashboards

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "observability" / "prometheus"
ALLOWED_LABELS = {
    "model",
    "pool",
    "role",
    "slo_class",
    "tier",
    "transport",
    "kind",
    "outcome",
    "policy",
    "direction",
    "replica",
    "weight_dtype",  # ridgeline_engine_info: the pool's formats
    "kv_dtype",
}
UNITS = ("_seconds", "_bytes", "_blocks", "_dollars", "_dollars_per_hour", "_total", "_replicas", "_ratio")


def test_dashboard_files_are_what_the_generator_makes():
    for name in dashboards.DASHBOARDS:
        assert (ROOT / "observability" / "grafana" / name).read_text() == dashboards.render(name), (
            f"{name} is stale: run python -m observability.grafana.dashboards"
        )


def test_promtool_checks_and_unit_tests_the_rules():
    check = subprocess.run(
        ["promtool", "check", "rules", "rules.yml", "alerts.yml"],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        ["promtool", "test", "rules", "rules_test.yml"], cwd=PROMETHEUS, capture_output=True, text=True
    )
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr


def _families():
    """(name, type, label names) of every ridgeline metric: the module-level ones and the engine collector's."""
    out = []
    for name in dir(metrics):
        obj = getattr(metrics, name)
        if hasattr(obj, "_name") and hasattr(obj, "_labelnames"):
            out.append((obj._name, obj._type, tuple(obj._labelnames)))
    for name in metrics.ENGINE_GAUGES:
        out.append((name, "gauge", tuple(worker_metrics._labels(name))))
    for name in metrics.ENGINE_COUNTERS:
        out.append((name, "counter", tuple(worker_metrics._labels(name))))
    out.append(
        (
            observability.aggregate.SCRAPE_FAILURES._name,
            "counter",
            tuple(observability.aggregate.SCRAPE_FAILURES._labelnames),
        )
    )
    return out


def test_metric_names_and_labels_follow_prometheus_conventions():
    families = _families()
    assert len(families) >= 35
    for name, kind, labels in families:
        assert re.fullmatch(r"ridgeline_[a-z][a-z0-9_]*[a-z0-9]", name), name
        assert "__" not in name, name
        if kind == "counter":  # prometheus_client adds _total to counters
            assert not name.endswith("_total"), f"{name}: the client appends _total"
        elif kind == "histogram":
            assert name.endswith(("_seconds", "_bytes")), f"{name}: histograms carry a base unit"
        elif kind == "gauge":
            assert (
                name.endswith(UNITS)
                or name.endswith("_info")  # an info metric: 1, with what it describes in its labels
                or name.startswith(("ridgeline_num_", "ridgeline_requests_in_flight"))
            ), name
        assert set(labels) <= ALLOWED_LABELS, f"{name}: labels {set(labels) - ALLOWED_LABELS}"
        assert "model" in labels or name.startswith(("ridgeline_router_", "ridgeline_metrics_")), name
        for label in labels:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", label), f"{name}: label {label}"
    names = [name for name, _, _ in families]
    assert len(names) == len(set(names))
