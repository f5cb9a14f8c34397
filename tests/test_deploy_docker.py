"""The Dockerfile: hadolint, its structure, its ENTRYPOINT + CMD + HEALTHCHECK run on the
host, then the image itself: built (docker where a daemon answers, else podman on a
debootstrap base, no registry needed), run read-only as uid 10001 until its HEALTHCHECK is
healthy, and scraped."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
import yaml
from pki import make_pki
from test_deploy_tools import check, tool

from helpers import ROOT, http_get
from testkit import free_port, wait_until

DOCKERFILE = ROOT / "Dockerfile"
CONFIG_IN_IMAGE = "/etc/zmq-exporter/config.yml"
HEALTHCHECK_IN_IMAGE = "/usr/local/lib/zmq-exporter/healthcheck.py"
HEALTHCHECK_SCRIPT = ROOT / "deploy" / "healthcheck.py"
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
    # The HEALTHCHECK is deploy/healthcheck.py, which follows the daemon's own arguments.
    assert healthcheck_command() == ["python", HEALTHCHECK_IN_IMAGE]
    assert ("COPY", f"deploy/healthcheck.py {HEALTHCHECK_IN_IMAGE}") in final


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


def healthcheck_on_host(daemon_pid: int) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, run here: the script is the repository's, and it
    reads the arguments of `daemon_pid` instead of PID 1's."""
    argv = [
        sys.executable if part == "python" else part.replace(HEALTHCHECK_IN_IMAGE, "")
        for part in healthcheck_command()
    ]
    assert argv[1] == "", argv  # the HEALTHCHECK runs the file COPY puts there
    argv[1] = str(HEALTHCHECK_SCRIPT)
    env = {**os.environ, "ZMQ_EXPORTER_HEALTHCHECK_PID": str(daemon_pid)}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=10, env=env, stdin=subprocess.DEVNULL
    )


def web_config(kind: str, directory: Path) -> list[str]:
    """Extra daemon flags for `kind`: none, basic auth, or TLS (certificates made here)."""
    if kind == "plain":
        return []
    path = directory / "web.yml"
    if kind == "basic-auth":
        hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
        path.write_text(f"basic_auth_users:\n  prometheus: {hashed}\n")
    else:
        (directory / "pki").mkdir()
        pki = make_pki(directory / "pki")
        path.write_text(
            f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n"
        )
    return [f"--web.config.file={path}"]


@pytest.mark.parametrize("kind", ["plain", "basic-auth", "tls"])
def test_entrypoint_and_cmd_start_the_daemon_and_healthcheck_sees_it(
    tmp_config: Path, kind: str
) -> None:
    script = console_script()
    assert Path(script).exists(), f"{script}: the package's console script is not installed"
    port = free_port()  # not 19555: the HEALTHCHECK must follow --web.listen-address
    listen = f"--web.listen-address=127.0.0.1:{port}"  # loopback only, in the test
    argv = []
    for arg in exec_form("ENTRYPOINT") + exec_form("CMD"):
        arg = arg.replace(CONFIG_IN_IMAGE, str(tmp_config))
        argv.append(listen if arg == f"--web.listen-address=:{PORT}" else arg)
    assert argv[0] == "zmq-exporter" and str(tmp_config) in argv[1] and listen in argv
    argv[0] = script
    argv += web_config(kind, tmp_config.parent)
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:

        def serving() -> bool:
            assert proc.poll() is None, f"exited {proc.returncode}: {proc.communicate()[0]!r}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(serving, timeout=15, interval=0.05, what=f"port {port}")
        if kind == "plain":  # it runs on the config that replaced the image's path
            metrics = http_get(f"http://127.0.0.1:{port}/metrics")
            assert 'socket="backend",type="ROUTER"' in metrics, metrics[:2000]
        health = healthcheck_on_host(proc.pid)
        assert health.returncode == 0, health  # the image's HEALTHCHECK command
        scheme = "https" if kind == "tls" else "http"
        assert health.stdout.startswith(f"healthy: {scheme}://127.0.0.1:{port}/-/healthy")
        assert ("401" in health.stdout) == (kind == "basic-auth"), health.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        done = healthcheck_on_host(proc.pid)
        assert done.returncode == 1, done  # and it notices when the daemon is gone
        assert done.stdout.startswith("unhealthy:"), done
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate(timeout=10)[0]
    assert b"Traceback" not in out, out


def test_healthcheck_reads_the_listen_address_as_argparse_does() -> None:
    """Both flag spellings, wildcard and IPv6 hosts, and the default when the flag is absent
    (the script is run as a module here: its functions, not a daemon)."""
    spec = importlib.util.spec_from_file_location("healthcheck", HEALTHCHECK_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cases = {
        ("--web.listen-address=:9999",): "http://127.0.0.1:9999/-/healthy",
        ("--web.listen-address", "0.0.0.0:9999"): "http://127.0.0.1:9999/-/healthy",
        ("--web.listen-address=[::]:9999",): "http://[::1]:9999/-/healthy",
        ("--web.listen-address=[::1]:9999",): "http://[::1]:9999/-/healthy",
        ("--web.listen-address=10.1.2.3:9999",): "http://10.1.2.3:9999/-/healthy",
        ("--config.file=x.yml",): f"http://127.0.0.1:{PORT}/-/healthy",
    }
    for args, expected in cases.items():
        listen = module.flag(list(args), "--web.listen-address") or module.DEFAULT_LISTEN
        assert module.url(listen, tls=False) == expected, args
    # The daemon's own default, which the script cannot import (it runs beside it).
    default = next(a for a in exec_form("CMD") if a.startswith("--web.listen-address=")).partition(
        "="
    )[2]
    assert module.DEFAULT_LISTEN == default == f":{PORT}"


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
