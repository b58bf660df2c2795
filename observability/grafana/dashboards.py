"""The Grafana dashboards, generated: `python -m observability.grafana.dashboards` writes serving.json,
kv_transfer.json and cost.json beside this file (a test checks the files match this code, and that every
expression returns data from a real Prometheus scraping a running app).

Variables: `datasource` (a Prometheus data source) and `model`; rates use `$__rate_interval`."""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
M = 'model=~"$model"'
RATE = "$__rate_interval"


def _q(quantile: float, metric: str, by: str) -> str:
    return f"histogram_quantile({quantile}, sum by (le, {by}) (rate({metric}_bucket{{{M}}}[{RATE}])))"


def _panel(title: str, exprs: list[tuple[str, str]], unit: str, description: str = "") -> dict:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "expr": expr,
                "legendFormat": legend,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
            }
            for i, (expr, legend) in enumerate(exprs)
        ],
    }


def _dashboard(uid: str, title: str, panels: list[dict]) -> dict:
    for i, panel in enumerate(panels):  # two panels a row, 8 units high
        panel["id"] = i + 1
        panel["gridPos"] = {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)}
    return {
        "uid": uid,
        "title": title,
        "tags": ["ridgeline"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
                {
                    "name": "model",
                    "type": "query",
                    "label": "Model",
                    "includeAll": True,
                    "multi": True,
                    "current": {"text": "All", "value": "$__all"},
                    "allValue": ".+",
                    "refresh": 2,
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": {"query": "label_values(ridgeline_requests_total, model)", "refId": "model"},
                    "definition": "label_values(ridgeline_requests_total, model)",
                },
            ]
        },
        "panels": panels,
    }


def serving() -> dict:
    return _dashboard(
        "ridgeline-serving",
        "Ridgeline / Serving",
        [
            _panel(
                "Requests by outcome",
                [(f"sum by (outcome) (rate(ridgeline_requests_total{{{M}}}[{RATE}]))", "{{outcome}}")],
                "reqps",
            ),
            _panel(
                "Tokens per second",
                [
                    (f"sum(rate(ridgeline_generation_tokens_total{{{M}}}[{RATE}]))", "generated"),
                    (f"sum(rate(ridgeline_prompt_tokens_total{{{M}}}[{RATE}]))", "prompt"),
                ],
                "short",
            ),
            _panel(
                "Time to first token by class",
                [
                    (_q(0.5, "ridgeline_time_to_first_token_seconds", "slo_class"), "p50 {{slo_class}}"),
                    (_q(0.9, "ridgeline_time_to_first_token_seconds", "slo_class"), "p90 {{slo_class}}"),
                    (_q(0.99, "ridgeline_time_to_first_token_seconds", "slo_class"), "p99 {{slo_class}}"),
                ],
                "s",
            ),
            _panel(
                "Time per output token by class",
                [
                    (_q(0.5, "ridgeline_time_per_output_token_seconds", "slo_class"), "p50 {{slo_class}}"),
                    (_q(0.9, "ridgeline_time_per_output_token_seconds", "slo_class"), "p90 {{slo_class}}"),
                    (_q(0.99, "ridgeline_time_per_output_token_seconds", "slo_class"), "p99 {{slo_class}}"),
                ],
                "s",
            ),
            _panel(
                "Inter-token latency",
                [(_q(0.9, "ridgeline_inter_token_latency_seconds", "slo_class"), "p90 {{slo_class}}")],
                "s",
            ),
            _panel(
                "End-to-end latency",
                [(_q(0.9, "ridgeline_e2e_request_latency_seconds", "slo_class"), "p90 {{slo_class}}")],
                "s",
            ),
            _panel(
                "Queue time at the workers",
                [(_q(0.9, "ridgeline_request_queue_time_seconds", "pool"), "p90 {{pool}}")],
                "s",
            ),
            _panel(
                "Running and waiting requests",
                [
                    (f"sum by (pool) (ridgeline_num_requests_running{{{M}}})", "running {{pool}}"),
                    (f"sum by (pool) (ridgeline_num_requests_waiting{{{M}}})", "waiting {{pool}}"),
                    (f"sum(ridgeline_requests_in_flight{{{M}}})", "in flight (frontend)"),
                ],
                "short",
            ),
            _panel(
                "Errors, rejections and invalid requests",
                [
                    (
                        f'sum by (outcome, slo_class) (rate(ridgeline_requests_total{{{M},outcome=~"error|rejected|invalid"}}'
                        f"[{RATE}]))",
                        "{{outcome}} {{slo_class}}",
                    )
                ],
                "reqps",
            ),
            _panel(
                "SLO attainment by class",
                [
                    (
                        f"sum by (slo_class) (rate(ridgeline_slo_met_requests_total{{{M}}}[{RATE}])) / sum by (slo_class) "
                        f'(rate(ridgeline_requests_total{{{M},outcome=~"stop|length"}}[{RATE}]))',
                        "{{slo_class}}",
                    )
                ],
                "percentunit",
                "Finished requests that met their class's TTFT and TPOT targets",
            ),
            _panel(
                "Preemptions",
                [(f"sum by (pool) (rate(ridgeline_preemptions_total{{{M}}}[{RATE}]))", "{{pool}}")],
                "short",
            ),
            _panel(
                "Speculative decoding",
                [
                    (
                        f"sum by (pool) (rate(ridgeline_spec_accepted_tokens_total{{{M}}}[{RATE}])) / sum by (pool) "
                        f"(rate(ridgeline_spec_draft_tokens_total{{{M}}}[{RATE}]))",
                        "acceptance {{pool}}",
                    ),
                    (
                        f"sum by (pool) (rate(ridgeline_spec_accepted_tokens_total{{{M}}}[{RATE}])) / sum by (pool) "
                        f"(rate(ridgeline_spec_verifications_total{{{M}}}[{RATE}]))",
                        "mean accepted length {{pool}}",
                    ),
                ],
                "short",
                "Drafted tokens accepted, and accepted per verification (tokens a step gains)",
            ),
        ],
    )


def kv_transfer() -> dict:
    return _dashboard(
        "ridgeline-kv",
        "Ridgeline / KV & transfer",
        [
            _panel(
                "KV usage by tier",
                [
                    (
                        f"sum by (pool, tier) (ridgeline_kv_used_blocks{{{M}}}) / sum by (pool, tier) "
                        f"(ridgeline_kv_capacity_blocks{{{M}}})",
                        "{{pool}} {{tier}}",
                    )
                ],
                "percentunit",
            ),
            _panel(
                "Prompt blocks served from cache, by tier",
                [
                    (
                        f"sum by (tier) (rate(ridgeline_kv_hit_blocks_total{{{M}}}[{RATE}])) / ignoring (tier) group_left "
                        f"sum(rate(ridgeline_kv_lookup_blocks_total{{{M}}}[{RATE}]))",
                        "{{tier}}",
                    )
                ],
                "percentunit",
            ),
            _panel(
                "KV moved between tiers",
                [
                    (
                        f"sum by (tier, direction) (rate(ridgeline_kv_moved_bytes_total{{{M}}}[{RATE}]))",
                        "{{direction}} {{tier}}",
                    )
                ],
                "Bps",
            ),
            _panel(
                "KV transfer throughput",
                [
                    (
                        f"sum by (pool, transport) (rate(ridgeline_kv_transfer_bytes_total{{{M}}}[{RATE}]))",
                        "{{pool}} {{transport}}",
                    )
                ],
                "Bps",
            ),
            _panel(
                "KV transfer latency",
                [
                    (_q(0.5, "ridgeline_kv_transfer_seconds", "transport"), "p50 {{transport}}"),
                    (_q(0.99, "ridgeline_kv_transfer_seconds", "transport"), "p99 {{transport}}"),
                ],
                "s",
            ),
            _panel(
                "KV transfer failures",
                [
                    (
                        f"sum by (pool, transport) (rate(ridgeline_kv_transfer_failures_total{{{M}}}[{RATE}]))",
                        "{{pool}} {{transport}}",
                    )
                ],
                "short",
            ),
            _panel(
                "Router: prompt blocks the chosen replica held",
                [
                    (
                        f"sum by (policy) (rate(ridgeline_router_matched_blocks_total[{RATE}])) / sum by (policy) "
                        f"(rate(ridgeline_router_prompt_blocks_total[{RATE}]))",
                        "{{policy}}",
                    )
                ],
                "percentunit",
            ),
        ],
    )


def cost() -> dict:
    return _dashboard(
        "ridgeline-cost",
        "Ridgeline / Cost",
        [
            _panel(
                "Tokens per dollar by pool and class",
                [
                    (
                        f"sum by (pool, slo_class) (rate(ridgeline_compute_tokens_total{{{M}}}[{RATE}])) / sum by "
                        f"(pool, slo_class) (rate(ridgeline_cost_dollars_total{{{M}}}[{RATE}]))",
                        "{{pool}} {{slo_class}}",
                    )
                ],
                "short",
            ),
            _panel(
                "Dollars per hour: charged to requests and provisioned",
                [
                    (
                        f"3600 * sum by (pool) (rate(ridgeline_cost_dollars_total{{{M}}}[{RATE}]))",
                        "charged {{pool}}",
                    ),
                    (
                        f"sum by (pool) (ridgeline_pool_price_dollars_per_hour{{{M}}} * ridgeline_pool_live_replicas{{{M}}})",
                        "provisioned {{pool}}",
                    ),
                ],
                "currencyUSD",
            ),
            _panel(
                "Cost per 1k requests",
                [
                    (
                        f"1000 * sum by (slo_class) (rate(ridgeline_cost_dollars_total{{{M}}}[{RATE}])) / sum by (slo_class) "
                        f'(rate(ridgeline_requests_total{{{M},outcome=~"stop|length"}}[{RATE}]))',
                        "{{slo_class}}",
                    )
                ],
                "currencyUSD",
            ),
            _panel(
                "SLO-met requests per dollar",
                [
                    (
                        f"sum by (slo_class) (rate(ridgeline_slo_met_requests_total{{{M}}}[{RATE}])) / sum by (slo_class) "
                        f"(rate(ridgeline_cost_dollars_total{{{M}}}[{RATE}]))",
                        "{{slo_class}}",
                    )
                ],
                "short",
            ),
            _panel(
                "Engine utilisation (busy share of wall time)",
                [
                    (
                        f"sum by (pool) (rate(ridgeline_engine_busy_seconds_total{{{M}}}[{RATE}])) / sum by (pool) "
                        f"(ridgeline_pool_live_replicas{{{M}}})",
                        "{{pool}}",
                    )
                ],
                "percentunit",
            ),
        ],
    )


DASHBOARDS = {"serving.json": serving, "kv_transfer.json": kv_transfer, "cost.json": cost}


def render(name: str) -> str:
    return json.dumps(DASHBOARDS[name](), indent=2, sort_keys=True) + "\n"


def main() -> None:
    for name in DASHBOARDS:
        (HERE / name).write_text(render(name))


if __name__ == "__main__":
    main()
