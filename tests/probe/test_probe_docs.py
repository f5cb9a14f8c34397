"""docs/probe.md says what the code does: its metrics table is the metrics
table's probe section, its reasons are the prober's, its examples load, and the SSRF
caution shows `allowed_targets`."""

from __future__ import annotations

import re

import yaml

from exporter.config import parse_config
from exporter.core import metrics
from exporter.prober import REASONS

from helpers import ROOT

PAGE = ROOT / "docs" / "probe.md"


def section() -> str:
    return PAGE.read_text()


def test_metrics_table_is_generated() -> None:
    assert metrics.markdown("probe") in section(), (
        "regenerate it with python -m exporter.core.metrics --markdown probe"
    )
    assert [f.name for f in metrics.PROBE_FAMILIES] == [
        "probe_success",
        "probe_duration_seconds",
        "probe_dns_lookup_time_seconds",
        "probe_zmtp_connect_duration_seconds",
        "probe_zmtp_handshake_duration_seconds",
        "probe_zmtp_info",
        "probe_zmtp_failure_info",
    ]


def test_reasons_table_is_the_prober_s() -> None:
    rows = re.findall(r"^\| `(\w+)` \| (?!gauge)", section(), re.MULTILINE)
    assert tuple(rows) == REASONS


def test_examples_load() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", section(), re.DOTALL)
    modules = [b for b in blocks if b.lstrip().startswith("modules:")]
    assert len(modules) == 2
    for block in modules:
        # The key files are examples: the module without them, as NULL.
        text = re.sub(r"(?m)^.*_key_file:.*\n", "", block).replace("CURVE", "NULL")
        assert parse_config(text, "docs/probe.md").modules
    (scrape,) = [b for b in blocks if b.startswith("scrape_configs:")]
    job = yaml.safe_load(scrape)["scrape_configs"][0]
    assert job["metrics_path"] == "/probe"
    relabel = job["relabel_configs"]
    assert relabel[0] == {"source_labels": ["__address__"], "target_label": "__param_target"}


def test_ssrf_caution() -> None:
    text = section()
    assert "**SSRF caution**" in text and "allowed_targets" in text.split("SSRF caution")[1]
