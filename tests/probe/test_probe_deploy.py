"""Deploy files for /probe (issue 17): the Prometheus job with its relabelling, the probe
alert rules (promtool checks and unit tests), the prometheus-operator Probe resource
(validated offline like the other CRDs) — and a real Prometheus scraping /probe for several
targets through that relabelling, where the probe-failure alert fires for the dead target
only."""

from __future__ import annotations

import copy
import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
import zmq
from test_deploy_e2e import DASHBOARD, Prometheus, probe_metric_names
from test_deploy_kubernetes import crd_errors
from test_deploy_tools import DEPLOY, check, tool

from exporter.core import metrics
from exporter.prober.target import parse_target

from helpers import ROOT, Daemon
from testkit import free_port, wait_until

PROBE_CONFIG = DEPLOY / "prometheus" / "prometheus-probe.yml"
PROBE_ALERTS = DEPLOY / "prometheus" / "probe-alerts.yml"
PROBE_ALERTS_TEST = DEPLOY / "prometheus" / "probe-alerts_test.yml"
PROBE_CR = DEPLOY / "kubernetes" / "probe" / "probe.yml"


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(PROBE_ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_checks_config_and_rules() -> None:
    out = check([tool("promtool"), "check", "config", str(PROBE_CONFIG)])
    assert "is valid prometheus config file syntax" in out
    out = check([tool("promtool"), "check", "rules", str(PROBE_ALERTS)])
    assert f"SUCCESS: {len(rules())} rules found" in out
    assert "SUCCESS" in check([tool("promtool"), "test", "rules", str(PROBE_ALERTS_TEST)])


def test_every_probe_alert_is_tested_firing_and_silent() -> None:
    cases = [
        case
        for test in yaml.safe_load(PROBE_ALERTS_TEST.read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    for rule in rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), rule["alert"]
        assert any(not case["exp_alerts"] for case in mine), rule["alert"]
        assert 'job="zmq_probe"' in rule["expr"], rule["alert"]
        assert "{{ $labels.instance }}" in rule["annotations"]["description"], rule["alert"]


def test_scrape_job_relabels_targets_into_the_parameter() -> None:
    (job,) = yaml.safe_load(PROBE_CONFIG.read_text())["scrape_configs"]
    assert (job["job_name"], job["metrics_path"], job["params"]) == (
        "zmq_probe",
        "/probe",
        {"module": ["zmtp"]},
    )
    for target in job["static_configs"][0]["targets"]:
        parse_target(target)
    section = (ROOT / "docs" / "probe.md").read_text()
    (block,) = [b for b in section.split("```yaml\n")[1:] if b.startswith("scrape_configs:")]
    documented = yaml.safe_load(block.split("```")[0])["scrape_configs"][0]
    assert documented["relabel_configs"] == job["relabel_configs"]


def test_probe_resource_validates_against_the_operator_schema() -> None:
    (doc,) = [d for d in yaml.safe_load_all(PROBE_CR.read_text()) if d]
    assert (doc["apiVersion"], doc["kind"]) == ("monitoring.coreos.com/v1", "Probe")
    assert crd_errors(doc) is None, crd_errors(doc)
    spec = doc["spec"]
    assert spec["jobName"] == "zmq_probe" and spec["prober"]["path"] == "/probe"
    assert spec["module"] == "zmtp"
    for target in spec["targets"]["staticConfig"]["static"]:
        parse_target(target)
    # The validation really checks: a typo and a wrong type fail.
    typo = copy.deepcopy(doc)
    typo["spec"]["prober"]["pth"] = "/probe"
    assert crd_errors(typo)
    wrong = copy.deepcopy(doc)
    wrong["spec"]["prober"]["scheme"] = "zmtp"
    assert crd_errors(wrong)


@pytest.fixture
def tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="zmq-exporter-probe-e2e-"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.mark.slow  # a real Prometheus scraping /probe: ~12 s
def test_real_prometheus_probes_through_relabelling(tmp: Path) -> None:
    """prometheus-probe.yml and probe-alerts.yml as shipped, with the targets, the
    exporter's address, the intervals and the alert's `for` made short."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    rep = ctx.socket(zmq.REP)
    live = [f"tcp://127.0.0.1:{s.bind_to_random_port('tcp://127.0.0.1')}" for s in (router, rep)]
    dead = f"tcp://127.0.0.1:{free_port()}"
    prom: Prometheus | None = None
    try:
        with Daemon("modules:\n  zmtp: {allowed_targets: ['tcp://127.0.0.1:*']}\n") as daemon:
            alerts = tmp / "probe-alerts.yml"
            alerts.write_text(PROBE_ALERTS.read_text().replace("for: 1m", "for: 3s"))
            config = yaml.safe_load(PROBE_CONFIG.read_text())
            config["global"].update(scrape_interval="1s", evaluation_interval="1s")
            config["rule_files"] = [str(alerts)]
            (job,) = config["scrape_configs"]
            job["static_configs"] = [{"targets": [*live, dead]}]
            job["relabel_configs"][-1]["replacement"] = f"127.0.0.1:{daemon.port}"
            prom = Prometheus.start(tmp, config)

            def success() -> dict[str, float]:
                rows = prom.query('probe_success{job="zmq_probe"}')
                return {r["metric"]["instance"]: float(r["value"][1]) for r in rows}

            want = {**{t: 1.0 for t in live}, dead: 0.0}
            wait_until(lambda: success() == want, timeout=30, what=f"{want} in Prometheus")
            rows = prom.query("probe_zmtp_failure_info")
            assert [(r["metric"]["instance"], r["metric"]["reason"]) for r in rows] == [
                (dead, "connect_refused")
            ]
            started = time.monotonic()

            def firing() -> list[str]:
                return sorted(
                    a["labels"]["instance"]
                    for a in prom.alerts("ZmqProbeFailed")
                    if a["state"] == "firing"
                )

            assert wait_until(firing, timeout=30, what="ZmqProbeFailed firing") == [dead]
            # An observation window, not a wait for a condition: two more evaluations (1 s
            # apart) must still find the dead target only.
            time.sleep(2)
            assert firing() == [dead] and time.monotonic() - started < 30
            assert all(a["labels"]["instance"] == dead for a in prom.alerts("ZmqProbeFailed"))
    finally:
        if prom is not None:
            prom.stop()
        ctx.destroy(linger=0)


def test_dashboard_probe_row_selects_probe_families() -> None:
    """The dashboard's Probes row selects only /probe's families (the metrics table's probe
    section), through its `probe_job` and `target` variables; test_deploy_e2e evaluates it."""
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["probe_job"]["definition"] == "label_values(probe_success, job)"
    assert "$probe_job" in variables["target"]["definition"]
    served = {f.name for f in metrics.PROBE_FAMILIES}
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    selected: set[str] = set()
    for expr in exprs:
        names = probe_metric_names(expr)
        if names:
            assert 'job=~"$probe_job",instance=~"$target"' in expr, expr
            assert names <= served, (names, expr)
            selected |= names
    assert selected == served  # every probe family has a panel
    (row,) = [p for p in dash["panels"] if p["type"] == "row" and p["title"] == "Probes"]
    assert all(
        p["gridPos"]["y"] > row["gridPos"]["y"]
        for p in dash["panels"]
        if p is not row and probe_metric_names(" ".join(t["expr"] for t in p.get("targets", [])))
    )
