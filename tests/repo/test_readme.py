"""README.md is the front page: its two commands are the ones the project runs (the daemon
on its default config; `.ci/run`'s test command), its quick-start configs load, and it stays
short: reference text belongs in docs/."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from exporter.config import parse_config

from helpers import ROOT

README = (ROOT / "README.md").read_text()
MAX_LINES = 250


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.M | re.S)


def test_the_two_commands_come_first() -> None:
    first, second = blocks("sh")[:2]
    assert first.strip() == (
        "python3 -m venv .venv && .venv/bin/pip install . && "
        ".venv/bin/zmq-exporter --config.file=config/zmq-exporter.yml"
    )
    assert (ROOT / "config" / "zmq-exporter.yml").is_file()
    assert second.strip() == "bash tests/run"
    # CI runs exactly the second command.
    ci = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert ci == ["exec bash tests/run"]
    # Nothing but the title and its sentence comes before them.
    assert README.index("```sh") < README.index("\n## ")


def test_quick_start_configs_load(tmp_path: Path) -> None:
    sockets, scrape, relay = blocks("yaml")
    config = parse_config(sockets, str(tmp_path / "sidecar.yml"))
    assert [s.name for s in config.sockets] == ["orders", "events"]
    with_relay = parse_config(sockets + relay, str(tmp_path / "sidecar.yml"))
    assert with_relay.relay is not None and with_relay.relay.expire == 300
    (job,) = yaml.safe_load(scrape)["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["localhost:19555"]


def test_readme_is_a_front_page() -> None:
    lines = README.count("\n")
    assert lines <= MAX_LINES, (
        f"README.md has {lines} lines (at most {MAX_LINES}): put reference text in a docs/ page "
        "and link it from the README's map"
    )
    # The map names every docs page.
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in README, f"docs/{page.name} is not in README's map"
