#!/usr/bin/env python3
"""Writes deploy/kubernetes/prometheusrule.yml from deploy/prometheus/alerts.yml, the one
source of truth for the alert rules.

    python3 deploy/gen-prometheusrule.py           # regenerate
    python3 deploy/gen-prometheusrule.py --check   # exit 1 if the file is out of date

tests/deploy/test_deploy_kubernetes.py runs --check and compares the rules themselves.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
SOURCE = DEPLOY / "prometheus" / "alerts.yml"
TARGET = DEPLOY / "kubernetes" / "prometheusrule.yml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by deploy/gen-prometheusrule.py - do not edit.
# prometheus-operator PrometheusRule carrying the zmq-exporter alert rules (runbooks:
# deploy/README.md). `release: prometheus` is the label a kube-prometheus-stack install
# selects by default (ruleSelector); adapt it to your Prometheus resource.
"""


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    groups = yaml.safe_load(SOURCE.read_text())["groups"]
    doc: dict[str, Any] = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "zmq-exporter",
            "namespace": "shop",
            "labels": {"app.kubernetes.io/name": "zmq-exporter", "release": "prometheus"},
        },
        "spec": {"groups": groups},
    }
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)
    return HEADER + body


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run {sys.argv[0]}", file=sys.stderr)
            return 1
        return 0
    if argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
