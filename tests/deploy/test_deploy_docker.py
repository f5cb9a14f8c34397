"""The Dockerfile: hadolint, its structure, its ENTRYPOINT + CMD + HEALTHCHECK run on the
host, then the image itself: built (docker where a daemon answers, else podman on a
debootstrap base, no registry needed), run read-only as uid 10001 until its HEALTHCHECK is
healthy, and scraped."""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from pki import make_pki
from test_deploy_tools import check, run, tool

from helpers import ROOT, Samples, http_get, missing_tool, parse_metrics, value
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
            # The web server answers before the sockets exist (/-/ready says when they do).
            wait_until(
                lambda: (
                    'socket="backend",type="ROUTER"' in http_get(f"http://127.0.0.1:{port}/metrics")
                ),
                timeout=15,
                what="the mounted config's ROUTER in /metrics",
            )
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


def healthcheck_module() -> Any:
    """deploy/healthcheck.py as a module: its functions, not a run."""
    spec = importlib.util.spec_from_file_location("healthcheck", HEALTHCHECK_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_reads_the_listen_addresses_as_argparse_does() -> None:
    """Both flag spellings, every address given, unique prefixes, wildcard and IPv6 hosts,
    and the default when the flag is absent."""
    module = healthcheck_module()
    cases = {
        ("--web.listen-address=:9999",): ["http://127.0.0.1:9999/-/healthy"],
        ("--web.listen-address", "0.0.0.0:9999"): ["http://127.0.0.1:9999/-/healthy"],
        ("--web.listen-address=[::]:9999",): ["http://[::1]:9999/-/healthy"],
        ("--web.listen-address=[::1]:9999",): ["http://[::1]:9999/-/healthy"],
        ("--web.listen-address=10.1.2.3:9999",): ["http://10.1.2.3:9999/-/healthy"],
        ("--config.file=x.yml",): [f"http://127.0.0.1:{PORT}/-/healthy"],
        ("--web.listen-address=:1", "--log.level", "debug", "--web.listen-address", ":2"): [
            "http://127.0.0.1:1/-/healthy",
            "http://127.0.0.1:2/-/healthy",
        ],
        # argparse takes a unique prefix; an ambiguous one (--web.) names no option
        ("--web.listen=:3", "--web.=:4"): ["http://127.0.0.1:3/-/healthy"],
        # a value that looks like an option is still the previous option's value
        ("--config.file", "--web.listen-address=:5"): [f"http://127.0.0.1:{PORT}/-/healthy"],
    }
    for args, expected in cases.items():
        options = module.parse(list(args))
        listen = options.get("--web.listen-address") or [module.DEFAULT_LISTEN]
        assert [module.url(a, tls=False) for a in listen] == expected, args
    # The script cannot import the daemon's parser (it runs beside it, every 30 s): its
    # option table and default must be the parser's.
    from exporter.cli import DEFAULT_LISTEN, build_parser

    takes_value = {
        name: action.nargs != 0
        for action in build_parser()._actions
        for name in action.option_strings
        if name.startswith("--")
    }
    assert takes_value == module.OPTIONS
    default = next(a for a in exec_form("CMD") if a.startswith("--web.listen-address=")).partition(
        "="
    )[2]
    assert module.DEFAULT_LISTEN == default == DEFAULT_LISTEN == f":{PORT}"


def test_healthcheck_checks_every_listen_address(tmp_config: Path) -> None:
    """A daemon on two addresses: both are checked. Arguments naming one more address where
    nothing answers: unhealthy, naming it."""
    ports = [free_port(), free_port()]
    listen = [f"--web.listen-address=127.0.0.1:{p}" for p in ports]
    proc = subprocess.Popen(
        [console_script(), f"--config.file={tmp_config}", *listen],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    # A process whose command line names the daemon's first address and a dead one.
    dead = free_port()
    stand_in = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; sys.stdin.read()",
            listen[0],
            f"--web.listen-address=127.0.0.1:{dead}",
        ],
        stdin=subprocess.PIPE,
    )
    try:
        wait_until(
            lambda: healthcheck_on_host(proc.pid).returncode == 0,
            timeout=15,
            what="the daemon healthy on both addresses",
        )
        health = healthcheck_on_host(proc.pid)
        assert (
            health.stdout
            == "healthy: " + "; ".join(f"http://127.0.0.1:{p}/-/healthy 200" for p in ports) + "\n"
        ), health
        partial = healthcheck_on_host(stand_in.pid)
        assert partial.returncode == 1, partial
        assert partial.stdout.startswith(f"unhealthy: http://127.0.0.1:{dead}/-/healthy"), partial
        assert str(ports[0]) not in partial.stdout, partial  # the live one passed
    finally:
        stand_in.communicate(b"", timeout=10)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=10)[0]
    assert proc.returncode == 0 and b"Traceback" not in out, out


def test_healthcheck_follows_systemd_socket_activation(tmp_config: Path) -> None:
    """--web.systemd-socket: the addresses are those of the sockets passed to the daemon
    (systemd-socket-activate passes them as systemd does, on two addresses here), whatever
    --web.listen-address says (the daemon ignores it then)."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        missing_tool("systemd-socket-activate (Debian systemd)")
        return
    port = free_port()
    proc = subprocess.Popen(
        [
            activate,
            f"--listen=127.0.0.1:{port}",
            f"--listen=[::1]:{port}",
            "--",
            console_script(),
            f"--config.file={tmp_config}",
            "--web.systemd-socket",
            "--web.listen-address=127.0.0.1:1",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        # The activator execs the daemon (same pid) on the first connection.
        def healthy() -> bool:
            assert proc.poll() is None, f"exited {proc.returncode}: {proc.communicate()[0]!r}"
            try:
                return "Healthy" in http_get(f"http://127.0.0.1:{port}/-/healthy", timeout=10)
            except OSError:  # the activator not listening yet
                return False

        wait_until(healthy, timeout=20, what="the socket-activated daemon")
        wait_until(
            lambda: healthcheck_on_host(proc.pid).returncode == 0,
            timeout=10,
            what="the HEALTHCHECK on the passed sockets",
        )
        health = healthcheck_on_host(proc.pid)
        assert health.stdout == (
            f"healthy: http://127.0.0.1:{port}/-/healthy 200; http://[::1]:{port}/-/healthy 200\n"
        ), health
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=10)[0]
    assert proc.returncode == 0 and b"Traceback" not in out, out
    gone = healthcheck_on_host(proc.pid)
    assert gone.returncode == 1 and gone.stdout.startswith("unhealthy:"), gone


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


# -- the image, built and run ------------------------------------------------------------
#
# docker where a daemon answers `docker info`; otherwise podman as root, on storage of its
# own (a temp dir, vfs: no fuse or overlay needed) that is deleted at the end. No registry
# is needed by podman: the base image is a Debian bookworm minbase from debootstrap (the
# apt mirror this machine uses) plus python3, python3-venv, python-is-python3 and this
# machine's CA bundle (pip in the build goes through the same network as the host's).
# The base is built once per pytest session, the image once per module.

UID = 10001


@dataclass
class Engine:
    kind: str  # "docker" or "podman"
    command: list[str]  # the engine and its global flags
    build_flags: list[str] = field(default_factory=list)
    run_flags: list[str] = field(default_factory=list)
    base_image: str | None = None  # PYTHON_IMAGE build-arg; None: the Dockerfile's default

    def __call__(
        self, *args: str, timeout: float = 60, ok: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.command, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )
        if ok:
            assert done.returncode == 0, (
                f"{self.kind} {args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done


def debian_mirror() -> str:
    """The Debian mirror apt uses on this machine (one-line .list or deb822 .sources)."""
    apt = Path("/etc/apt")
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*"))]:
        if not path.is_file():
            continue
        text = path.read_text()
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, list[str]] = {}
                for line in stanza.splitlines():
                    if not line.startswith("#") and ":" in line:
                        key, _, value = line.partition(":")
                        fields[key.strip().lower()] = value.split()
                if "deb" in fields.get("types", []) and "bookworm" in fields.get("suites", []):
                    return fields["uris"][0]
        elif path.suffix == ".list":
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.partition("#")[0]).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == "bookworm":
                    return words[1]
    return "http://deb.debian.org/debian"


BASE_CONTAINERFILE = """\
FROM {debian}
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
       python3 python3-venv python-is-python3 \\
    && rm -rf /var/lib/apt/lists/*
# After apt: the ca-certificates package would regenerate the bundle.
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
"""


VFS = ["--storage-driver", "vfs"]
FORMAT_DOCKER = ["--format", "docker"]
ULIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]


def podman_engine(work: Path) -> Engine:
    return Engine(
        "podman",
        [tool("podman"), "--root", f"{work}/storage", "--runroot", f"{work}/run", *VFS],
        # --format docker: the OCI format has no HEALTHCHECK and podman drops it.
        # --layers=false: no image per step (each is a full copy of the tree on vfs).
        build_flags=[
            *FORMAT_DOCKER,
            "--isolation",
            "chroot",
            "--network",
            "host",
            "--layers=false",
        ],
        # runc fails on setrlimit here unless the limits are given.
        run_flags=["--runtime", "runc", *ULIMITS, "--network", "host"],
    )


def base_cache() -> Path:
    """Where the debootstrap base image is kept between runs (it is minutes of download
    and unpacking, and the same for every run): $ZMQ_EXPORTER_TEST_CACHE, else
    $XDG_CACHE_HOME/zmq-exporter-tests, else ~/.cache/zmq-exporter-tests."""
    if os.environ.get("ZMQ_EXPORTER_TEST_CACHE"):
        return Path(os.environ["ZMQ_EXPORTER_TEST_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "zmq-exporter-tests"


def base_archive(mirror: str) -> Path:
    """The cached base's file, named by everything it is made of: the suite and variant,
    the mirror, the Containerfile that adds python3, and the CA bundle copied in. Any change
    of these makes a new name, so a stale base is never used; delete the directory to
    take Debian's updates."""
    key = hashlib.sha256()
    for part in ("bookworm", "minbase", mirror, BASE_CONTAINERFILE):
        key.update(part.encode() + b"\0")
    key.update(Path("/etc/ssl/certs/ca-certificates.crt").read_bytes())
    return base_cache() / f"debian-bookworm-python3-{key.hexdigest()[:16]}.tar"


def podman_with_debootstrap_base(work: Path) -> Engine:
    engine = podman_engine(work)
    tool("runc")  # the runtime `run` is given
    engine.base_image = "localhost/zmq-exporter-test/python:3.11-bookworm"
    mirror = debian_mirror()
    archive = base_archive(mirror)
    started = time.monotonic()
    if archive.is_file():
        engine("load", "-i", str(archive), timeout=600)
        print(f"\n[image] debootstrap base from {archive}: {time.monotonic() - started:.0f} s")
        return engine
    debootstrap = tool("debootstrap")
    rootfs = work / "rootfs"
    done = subprocess.run(
        [debootstrap, "--variant=minbase", "bookworm", str(rootfs), mirror],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"debootstrap:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    debian = "localhost/zmq-exporter-test/debian:bookworm"
    with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
        imported = subprocess.run(
            [*engine.command, "import", "-", debian],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert tar.returncode == 0 and imported.returncode == 0, imported.stderr
    shutil.rmtree(rootfs)
    context = work / "base"
    context.mkdir()
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", context / "ca-certificates.crt")
    (context / "Containerfile").write_text(BASE_CONTAINERFILE.format(debian=debian))
    engine("build", *engine.build_flags, "-t", engine.base_image, str(context), timeout=600)
    print(f"\n[image] debootstrap base with python3: {time.monotonic() - started:.0f} s")
    # Kept for the next run: written aside, then renamed (a run cut short leaves no half).
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(f"{archive.name}.{os.getpid()}.partial")
    engine("save", "--format", "docker-archive", "-o", str(partial), engine.base_image, timeout=600)
    partial.rename(archive)
    return engine


def daemon_answers(docker: str) -> bool:
    try:
        return run([docker, "info"], timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    docker = shutil.which("docker")
    if docker and daemon_answers(docker):
        yield Engine("docker", [docker], run_flags=["--network", "host"])
        return
    work = Path(tempfile.mkdtemp(prefix="zmq-exporter-podman-"))
    try:
        yield podman_with_debootstrap_base(work)
    finally:
        # Everything in this storage is the session's own; its images go by id, then the
        # directory (vfs layers are plain directories).
        if (work / "storage").exists():
            podman = podman_engine(work)
            ids = podman("images", "-a", "-q", ok=False).stdout.split()
            if ids:
                podman("rmi", "-f", *ids, ok=False, timeout=300)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def image(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    iidfile = tmp_path_factory.mktemp("image") / "iid"
    tag = f"localhost/zmq-exporter-test:{uuid.uuid4().hex[:12]}"
    args = ["build", *engine.build_flags, "--iidfile", str(iidfile), "-t", tag]
    if engine.base_image is not None:
        args += ["--build-arg", f"PYTHON_IMAGE={engine.base_image}"]
    started = time.monotonic()
    engine(*args, str(ROOT), timeout=900)
    image_id = iidfile.read_text().strip()
    size = int(engine("image", "inspect", "--format", "{{.Size}}", image_id).stdout)
    print(f"\n[image] {engine.kind} build: {time.monotonic() - started:.0f} s, {size / 1e6:.0f} MB")
    try:
        yield image_id
    finally:
        engine("rmi", "-f", image_id, ok=False)


def run_in_image(
    engine: Engine, image_id: str, *args: str, entrypoint: str | None = None
) -> subprocess.CompletedProcess[str]:
    """One throwaway container, read-only, as the image's user."""
    flags = ["--entrypoint", entrypoint] if entrypoint else []
    return engine(
        "run", "--rm", "--read-only", *engine.run_flags, *flags, image_id, *args, ok=False
    )


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the first test builds the base and the image (~3-4 min here)
def test_image_runs_read_only_as_uid_10001_until_healthy_and_serves_metrics(
    engine: Engine, image: str, tmp_path: Path
) -> None:
    zmq_port, web_port = free_port(), free_port()
    config = tmp_path / "config.yml"
    config.write_text(
        textwrap.dedent(f"""\
            sockets:
              - {{name: backend, type: ROUTER, bind: ['tcp://127.0.0.1:{zmq_port}']}}
              - {{name: worker, type: DEALER, connect: ['tcp://127.0.0.1:{zmq_port}']}}
            """)
    )
    config.chmod(0o644)  # the container's user (10001) reads it through the bind mount
    name = f"zmq-exporter-test-{uuid.uuid4().hex[:12]}"
    health = ["--health-interval", "1s"] if engine.kind == "docker" else []
    engine(
        "run",
        "-d",
        "--name",
        name,
        "--read-only",
        *engine.run_flags,
        *health,
        "-v",
        f"{config}:{CONFIG_IN_IMAGE}:ro",
        image,
        # Not the default port: the HEALTHCHECK must follow --web.listen-address.
        f"--config.file={CONFIG_IN_IMAGE}",
        f"--web.listen-address=127.0.0.1:{web_port}",
    )
    try:

        def inspect(template: str) -> str:
            return engine("inspect", "--format", template, name).stdout.strip()

        def healthy() -> bool:
            assert inspect("{{.State.Running}}") == "true", engine("logs", name, ok=False)
            if engine.kind == "podman":  # no systemd here to run podman's health timer
                engine("healthcheck", "run", name, ok=False)
            return inspect("{{.State.Health.Status}}") == "healthy"

        wait_until(healthy, timeout=60, interval=0.5, what="HEALTHCHECK healthy")
        assert inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"
        assert inspect("{{.Config.User}}") == f"{UID}:{UID}"
        # The kernel's word on who runs the daemon (no user namespace: host ids).
        status = Path(f"/proc/{inspect('{{.State.Pid}}')}/status").read_text()
        ids = {
            k: v.split()
            for k, v in (line.split(":", 1) for line in status.splitlines())
            if k in ("Uid", "Gid")
        }
        assert ids == {"Uid": [str(UID)] * 4, "Gid": [str(UID)] * 4}, ids
        write = engine("exec", name, "python", "-c", "open('/opt/venv/probe', 'w')", ok=False)
        assert write.returncode != 0 and "Read-only file system" in write.stderr, write

        def connected() -> Samples:
            samples = parse_metrics(http_get(f"http://127.0.0.1:{web_port}/metrics"))
            return samples if value(samples, "zmq_connections", socket="backend") == 1 else {}

        samples = wait_until(connected, timeout=30, interval=0.2, what="backend connected")
        assert value(samples, "zmq_connections", socket="worker") == 1
        assert any(n == "zmq_exporter_build_info" for n, _ in samples)
        engine("stop", "-t", "10", name, timeout=30)
        assert inspect("{{.State.ExitCode}}") == "0"  # SIGTERM to PID 1: a clean exit
        logs = engine("logs", name)
        assert "Traceback" not in logs.stdout + logs.stderr, logs
    finally:
        engine("rm", "-f", name, ok=False)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_image_default_config_is_the_readmes_and_carries_no_pip(engine: Engine, image: str) -> None:
    # README's first command runs config/zmq-exporter.yml; the image runs the same file
    # unless one is mounted over it.
    readme = (ROOT / "README.md").read_text()
    first = readme.split("```sh\n", 1)[1].split("```", 1)[0]
    assert "--config.file=config/zmq-exporter.yml" in first, first
    # One container (each costs a copy of the image on vfs): it reports what it sees, and
    # runs the image's own ENTRYPOINT + CMD with --config.check (the baked-in config is
    # valid in the image).
    probe = textwrap.dedent("""\
        import importlib.util, json, os, subprocess, sys
        check = subprocess.run(json.loads(sys.argv[1]), capture_output=True, text=True)
        print(json.dumps({
            "uid": os.getuid(), "gid": os.getgid(),
            "config": open("/etc/zmq-exporter/config.yml").read(),
            "pip": importlib.util.find_spec("pip") is not None,
            "setuptools": importlib.util.find_spec("setuptools") is not None,
            "check": [check.returncode, check.stdout + check.stderr],
            "licenses": [
                open(os.path.join(d, "LICENSE"), "rb").read().hex()
                for d, _, files in os.walk("/opt/venv")
                if d.endswith("/licenses") and "zmq_exporter-" in d and "LICENSE" in files
            ],
            "venv_bytes": sum(
                os.lstat(os.path.join(d, f)).st_size
                for d, _, files in os.walk("/opt/venv") for f in files
            ),
        }))""")
    argv = [*exec_form("ENTRYPOINT"), "--config.check", *exec_form("CMD")]
    done = run_in_image(engine, image, "-c", probe, json.dumps(argv), entrypoint="python")
    assert done.returncode == 0, done
    facts = json.loads(done.stdout)
    assert facts["config"] == (ROOT / "config" / "zmq-exporter.yml").read_text()
    assert (facts["uid"], facts["gid"]) == (UID, UID)
    assert not facts["pip"] and not facts["setuptools"], facts  # left in the builder
    assert facts["check"][0] == 0, facts["check"]
    # The package's LICENSE is in the image (its dist-info, from pyproject's license-files).
    assert [bytes.fromhex(h) for h in facts["licenses"]] == [(ROOT / "LICENSE").read_bytes()]
    print(f"\n[image] /opt/venv: {facts['venv_bytes'] / 1e6:.0f} MB")
