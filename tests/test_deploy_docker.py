"""The Dockerfile: hadolint, its structure, and its ENTRYPOINT + CMD + HEALTHCHECK run for
real on the host (no container engine runs here, so the image itself cannot be built: the
commands it would run are run instead, with the console script this project installs)."""

from __future__ import annotations

import fnmatch
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from test_deploy_tools import check, run, tool

from helpers import ROOT, http_get
from testkit import free_port, wait_until

DOCKERFILE = ROOT / "Dockerfile"
CONFIG_IN_IMAGE = "/etc/zmq-exporter/config.yml"
PORT = 19555


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last_from:]


def exec_form(instruction: str) -> list[str]:
    (args,) = [a for k, a in final_stage() if k == instruction]
    value = json.loads(args)  # exec form is a JSON array; shell form would not parse
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck_command() -> list[str]:
    (args,) = [a for k, a in final_stage() if k == "HEALTHCHECK"]
    _, _, cmd = args.partition("CMD ")
    value = json.loads(cmd)
    assert isinstance(value, list)
    return [str(v) for v in value]


def test_hadolint_is_clean() -> None:
    check([tool("hadolint"), "--failure-threshold", "style", str(DOCKERFILE)])


def test_dockerfile_shape() -> None:
    steps = instructions()
    froms = [a for k, a in steps if k == "FROM"]
    assert len(froms) >= 2 and " AS builder" in froms[0], froms  # multi-stage
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim"), args
    final = final_stage()
    keywords = [k for k, _ in final]
    # Dependencies come from the builder's venv, nothing is pip-installed in the final stage.
    assert not any(k == "RUN" and "pip" in a for k, a in final)
    assert any(k == "COPY" and a.startswith("--from=builder /opt/venv") for k, a in final)
    (user,) = [a for k, a in final if k == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0, user  # numeric: runAsNonRoot can check it
    assert [a for k, a in final if k == "EXPOSE"] == [str(PORT)]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert exec_form("ENTRYPOINT") == ["zmq-exporter"]
    assert exec_form("CMD") == [f"--config.file={CONFIG_IN_IMAGE}", f"--web.listen-address=:{PORT}"]
    health = healthcheck_command()
    assert health[:2] == ["python", "-c"] and f"127.0.0.1:{PORT}/-/healthy" in health[2]


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:  # Docker's rule: the last matching pattern wins
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/"):
                result = not negate
        return result

    sources = []
    for keyword, args in instructions():
        if keyword == "COPY" and not args.startswith("--from"):
            sources += args.split()[:-1]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source.rstrip("/")), f"{source} is excluded by .dockerignore"
    for private in (".venv", ".git", "tests", ".ci"):
        assert ignored(private), f"{private} would be sent to the build context"
    config = ROOT / "config" / "zmq-exporter.yml"
    assert "config/zmq-exporter.yml" in sources
    # The config baked into the image is valid.
    check([console_script(), "--config.check", f"--config.file={config}"])


def console_script() -> str:
    """The `zmq-exporter` console script of this install (the image has it on PATH)."""
    script = Path(sys.executable).parent / "zmq-exporter"
    return str(script) if script.exists() else str(shutil.which("zmq-exporter") or script)


@pytest.fixture
def tmp_config() -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="zmq-exporter-docker-"))
    config = tmp / "config.yml"
    port = free_port()
    config.write_text(
        textwrap.dedent(f"""\
            sockets:
              - {{name: backend, type: ROUTER, bind: ['tcp://127.0.0.1:{port}']}}
              - {{name: worker, type: DEALER, connect: ['tcp://127.0.0.1:{port}']}}
            """)
    )
    yield config
    shutil.rmtree(tmp, ignore_errors=True)


def test_entrypoint_and_cmd_start_the_daemon_and_healthcheck_sees_it(tmp_config: Path) -> None:
    script = console_script()
    assert Path(script).exists(), f"{script}: the package's console script is not installed"
    port = free_port()
    listen = f"--web.listen-address=127.0.0.1:{port}"  # loopback only, in the test
    argv = []
    for arg in exec_form("ENTRYPOINT") + exec_form("CMD"):
        arg = arg.replace(CONFIG_IN_IMAGE, str(tmp_config))
        argv.append(listen if arg == f"--web.listen-address=:{PORT}" else arg)
    assert argv[0] == "zmq-exporter" and str(tmp_config) in argv[1] and listen in argv
    argv[0] = script
    health = [
        sys.executable if part == "python" else part.replace(f":{PORT}/", f":{port}/")
        for part in healthcheck_command()
    ]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:

        def healthy() -> bool:
            assert proc.poll() is None, f"exited {proc.returncode}: {proc.communicate()[0]!r}"
            try:
                http_get(f"http://127.0.0.1:{port}/-/healthy", timeout=1)
                return True
            except OSError:
                return False

        wait_until(healthy, timeout=15, interval=0.05, what="/-/healthy")
        # It runs on the config that replaced the image's path.
        metrics = http_get(f"http://127.0.0.1:{port}/metrics")
        assert 'socket="backend",type="ROUTER"' in metrics, metrics[:2000]
        assert run(health, timeout=10).returncode == 0  # the image's HEALTHCHECK command
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        done = run(health, timeout=10)
        assert done.returncode != 0  # and it notices when the daemon is gone
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate(timeout=10)[0]
    assert b"Traceback" not in out, out


def test_compose_file_uses_the_image_contract() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    exporter = compose["services"]["zmq-exporter"]
    assert exporter["build"]["dockerfile"] == "Dockerfile"
    assert exporter["read_only"] is True
    assert any(v.endswith(f":{CONFIG_IN_IMAGE}:ro") for v in exporter["volumes"])
    for volume in [v for s in compose["services"].values() for v in s.get("volumes", [])]:
        source = volume.split(":")[0]
        if source.startswith("."):
            assert (ROOT / "deploy" / source).resolve().exists(), volume
    assert f"{PORT}:{PORT}" in exporter["ports"]
    targets = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = targets["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"zmq-exporter:{PORT}"]
