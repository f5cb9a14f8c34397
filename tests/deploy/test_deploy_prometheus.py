"""Alert rules and scrape config, checked and unit-tested with promtool (no Prometheus
server needed; tests/deploy/test_deploy_e2e.py runs them against a real one)."""

from __future__ import annotations

import re
from typing import Any

import yaml
from test_deploy_tools import DEPLOY, check, tool

ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RUNBOOK = DEPLOY / "README.md"
# Alerts about the exporter process itself: they have no socket/endpoint to name.
EXPORTER_LEVEL = {
    "ZmqExporterDown",
    "ZmqExporterAbsent",
    "ZmqExporterConfigReloadFailed",
    "ZmqExporterConnectionSamplerStale",
    "ZmqExporterRelaySeriesNearLimit",
}
# Alerts on library mode's message counts: one series per socket, no endpoint to name.
SOCKET_LEVEL = {"ZmqSendBlockedMostOfTheTime"}


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules() -> None:
    out = check([tool("promtool"), "check", "rules", str(ALERTS)])
    assert f"SUCCESS: {len(alert_rules())} rules found" in out


def test_promtool_test_rules() -> None:
    out = check([tool("promtool"), "test", "rules", str(ALERTS_TEST)])
    assert "SUCCESS" in out


def test_promtool_check_scrape_config() -> None:
    out = check([tool("promtool"), "check", "config", str(SCRAPE_CONFIG)])
    assert "is valid prometheus config file syntax" in out


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    cases = [
        case
        for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    for rule in alert_rules():
        name = rule["alert"]
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name}: no test where it fires"
        assert any(not case["exp_alerts"] for case in mine), f"{name}: no test where it is silent"
        for case in mine:
            for alert in case["exp_alerts"]:
                assert set(alert["exp_annotations"]) == set(rule["annotations"]), name
                assert alert["exp_labels"]["severity"] == rule["labels"]["severity"], name


def test_every_alert_documents_itself_and_has_a_runbook_section() -> None:
    runbook = RUNBOOK.read_text()
    headings = {m.lower() for m in re.findall(r"^#+ +(Zmq\w+)\s*$", runbook, re.MULTILINE)}
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    for rule in alert_rules():
        name = rule["alert"]
        annotations = rule["annotations"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert annotations["summary"] and annotations["description"], name
        if name not in EXPORTER_LEVEL:
            labels = (
                ("socket", "instance")
                if name in SOCKET_LEVEL
                else ("socket", "endpoint", "instance")
            )
            for label in labels:
                assert "{{ $labels." + label + " }}" in annotations["description"], (name, label)
        assert annotations["runbook"] == f"deploy/README.md#{name.lower()}", name
        assert name.lower() in headings, f"{name}: no runbook section in deploy/README.md"
