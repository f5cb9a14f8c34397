"""Distribution: what a user gets outside the clone.

- LICENSE is the official Apache-2.0 text and ships in the sdist and the wheel.
- The sdist (`python -m build`, built from the repository) carries the tests and what they
  read, and builds the wheel (`python -m build` builds the wheel from the sdist); the wheel
  carries the embedded default config and py.typed.
- That wheel, installed in a clean venv, runs as `zmq-exporter` with no flags from an empty
  directory and serves the embedded default's sockets on /metrics; a couple of test files run
  from the unpacked sdist.
- README's first command works as written in a fresh clone.
- The systemd units pass `systemd-analyze verify` (and its offline security review), and the
  service's ExecStart runs socket-activated.

One build and one venv per module (~20 s together here, from the pip cache and the local
wheel mirror), one more venv for README's first command.
"""

from __future__ import annotations

import configparser
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from exporter.cli import DEFAULT_LISTEN
from exporter.config import load_config
from exporter.daemon import fd_reserve
from exporter.monitor.fdbudget import BASE_FDS, fd_budget_problem, specs_fds

from helpers import ROOT, http_get, missing_tool
from testkit import free_port, wait_until

# md5 of https://www.apache.org/licenses/LICENSE-2.0.txt (also Debian's
# /usr/share/common-licenses/Apache-2.0, which LICENSE was copied from).
APACHE_2_MD5 = "3b83ef96387f14655fc854ddc3c6bd57"
DEFAULT_SOCKETS = {"backend", "worker", "upstream-missing"}  # config/zmq-exporter.yml
UNITS = ROOT / "deploy" / "systemd"
UNIT_EXEC = "/opt/zmq-exporter/bin/zmq-exporter"  # the install path the units document


def run(argv: list[str | Path], timeout: float = 600, **kwargs: object) -> str:
    done = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **kwargs,  # type: ignore[call-overload]
    )
    assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return str(done.stdout)


@dataclass
class Dists:
    sdist: Path
    wheel: Path  # built from the sdist


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    out = tmp_path_factory.mktemp("dist")
    # The sdist from the repository, then the wheel from the unpacked sdist (build's default).
    run([sys.executable, "-m", "build", "--outdir", out, ROOT])
    (sdist,) = out.glob("zmq_exporter-*.tar.gz")
    (wheel,) = out.glob("zmq_exporter-*.whl")
    return Dists(sdist, wheel)


@pytest.fixture(scope="module")
def venv(dists: Dists, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean venv (no site packages) with only the wheel and its dependencies."""
    path = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", path])
    run([path / "bin" / "pip", "install", "--quiet", dists.wheel])
    return path


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("::", port))
        except OSError:
            return False
    return True


def exited_unless_port_taken(proc: subprocess.Popen[bytes], log: Path) -> None:
    """Fail if the daemon exited, but skip if another process took the default port between
    the check that it was free and the daemon's bind (tests of other files, a user's)."""
    if proc.poll() is None:
        return
    text = log.read_text()
    if "cannot listen on" in text and "Address already in use" in text:
        missing_tool(f"the default port (taken meanwhile: {text[-300:]})")
    raise AssertionError(f"exited {proc.returncode}: {text}")


def test_license_is_the_official_apache_text() -> None:
    assert hashlib.md5((ROOT / "LICENSE").read_bytes()).hexdigest() == APACHE_2_MD5
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()


def test_embedded_default_is_config_zmq_exporter_yml() -> None:
    """One content: the packaged default is the file README and the image run."""
    packaged = ROOT / "exporter" / "config" / "default.yml"
    assert packaged.read_bytes() == (ROOT / "config" / "zmq-exporter.yml").read_bytes()


def test_sdist_carries_license_tests_and_what_they_read(dists: Dists) -> None:
    with tarfile.open(dists.sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "testkit.py",
        "Dockerfile",
        "config/zmq-exporter.yml",
        "config/example.yml",
        "exporter/config/default.yml",
        "exporter/py.typed",
        "tests/conftest.py",
        "tests/helpers.py",
        "tests/run",
        "tests/system-packages.txt",
        "tests/deploy/test_distribution.py",
        "bench/__main__.py",
        "deploy/healthcheck.py",
        "deploy/systemd/zmq-exporter.service",
        "deploy/systemd/zmq-exporter.socket",
        "deploy/prometheus/alerts.yml",
    }
    assert wanted <= names, sorted(wanted - names)
    assert any(n.startswith("tests/testdata/") for n in names)
    assert any(n.startswith("docs/") and n.endswith(".md") for n in names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_carries_license_default_config_and_typing_marker(dists: Dists) -> None:
    with zipfile.ZipFile(dists.wheel) as whl:
        names = set(whl.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = whl.read(metadata).decode()
        (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert hashlib.md5(whl.read(license_file)).hexdigest() == APACHE_2_MD5
        assert (
            whl.read("exporter/config/default.yml")
            == (ROOT / "config/zmq-exporter.yml").read_bytes()
        )
    assert "exporter/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "testkit"))]
    assert "License-Expression: Apache-2.0" in meta
    assert "License-File: LICENSE" in meta
    assert "Classifier: Typing :: Typed" in meta


def test_installed_wheel_runs_with_no_flags_from_any_directory(venv: Path, tmp_path: Path) -> None:
    """`zmq-exporter` alone, from an empty directory: the embedded default's sockets on
    /metrics, on the default address when it is free (else on one given address, the
    config still the embedded one)."""
    exe = venv / "bin" / "zmq-exporter"
    # argparse wraps at the terminal's width, also inside paths: one line per option
    help_text = run([exe, "--help"], cwd=tmp_path, env={**os.environ, "COLUMNS": "1000"})
    flat = " ".join(help_text.split())
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert f"at {site}/exporter/config/default.yml)" in flat, flat
    assert f"(default: {DEFAULT_LISTEN})" in flat, flat
    default_port = int(DEFAULT_LISTEN.rpartition(":")[2])
    # The embedded default is valid, from any directory.
    assert "OK (3 sockets)" in run([exe, "--config.check"], cwd=tmp_path)
    if port_free(default_port):
        args: list[str] = []
        base = f"http://127.0.0.1:{default_port}"
    else:  # a daemon of another test or a user holds it: the config is what is checked
        port = free_port()
        args = [f"--web.listen-address=127.0.0.1:{port}"]
        base = f"http://127.0.0.1:{port}"
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [exe, *args], cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:

        def sockets() -> set[str]:
            exited_unless_port_taken(proc, log)
            try:
                text = http_get(f"{base}/metrics")
            except OSError:
                return set()
            seen = set(re.findall(r'^zmq_socket_info\{[^}]*socket="([^"]+)"', text, re.M))
            return seen if seen >= DEFAULT_SOCKETS else set()

        seen = wait_until(sockets, timeout=30, what="the embedded default's sockets")
        assert seen == DEFAULT_SOCKETS
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert f"config={site}/exporter/config/default.yml" in text, text
    assert "Traceback" not in text, text


def test_installed_package_is_typed(venv: Path) -> None:
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert (site / "exporter" / "py.typed").exists()
    assert (site / "exporter" / "config" / "default.yml").exists()
    (license_file,) = site.glob("zmq_exporter-*.dist-info/licenses/LICENSE")
    assert hashlib.md5(license_file.read_bytes()).hexdigest() == APACHE_2_MD5


def test_tests_run_from_the_unpacked_sdist(dists: Dists, venv: Path, tmp_path: Path) -> None:
    """Two fast test files from the sdist, in the clean venv plus pytest: the sdist's own
    tree is what they import."""
    with tarfile.open(dists.sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    (tree,) = tmp_path.glob("zmq_exporter-*")
    run([venv / "bin" / "pip", "install", "--quiet", "pytest>=8", "pytest-timeout>=2.3"])
    selected = [
        "tests/config/test_config.py",
        "tests/deploy/test_distribution.py::test_license_is_the_official_apache_text",
        "tests/deploy/test_distribution.py::test_embedded_default_is_config_zmq_exporter_yml",
    ]
    pytest_argv: list[str | Path] = [venv / "bin" / "python", "-m", "pytest", "-q"]
    out = run([*pytest_argv, "-p", "no:cacheprovider", *selected], cwd=tree, timeout=300)
    assert re.search(r"\b\d{2,} passed\b", out) and "failed" not in out, out
    where = run(
        [venv / "bin" / "python", "-c", "import exporter.config as c; print(c.__file__)"],
        cwd=tree,
    )
    assert where.strip() == str(tree / "exporter" / "config" / "__init__.py")


@pytest.fixture
def default_port_free() -> int:
    port = int(DEFAULT_LISTEN.rpartition(":")[2])
    if not port_free(port):
        # README's command listens there, as written: nothing else to try.
        missing_tool(f"a free port {port} (README's first command needs it)")
    return port


@pytest.mark.timeout(600)
def test_readme_first_command_works_in_a_fresh_clone(
    default_port_free: int, tmp_path: Path
) -> None:
    """The first ```sh block of README.md, run as written by bash in a fresh clone (the
    committed tree), until /metrics shows the default config's sockets; then SIGTERM."""
    if not (ROOT / ".git").exists():
        missing_tool("a git checkout (this is an unpacked sdist)")
    clone = tmp_path / "clone"
    run(["git", "clone", "--quiet", ROOT, clone])
    readme = (clone / "README.md").read_text()
    first = readme.split("```sh\n", 1)[1].split("```", 1)[0]
    log = tmp_path / "readme.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["bash", "-c", first],
            cwd=clone,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # bash and the daemon: one group, ours to signal
        )
    try:

        def sockets() -> bool:
            exited_unless_port_taken(proc, log)
            try:
                text = http_get(f"http://127.0.0.1:{default_port_free}/metrics")
            except OSError:
                return False
            return all(f'socket="{name}"' in text for name in DEFAULT_SOCKETS)

        wait_until(sockets, timeout=300, interval=0.5, what=f"README's command: {first!r}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    assert "Traceback" not in log.read_text()


# ---- systemd


def systemd_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing_tool(f"{name} (Debian systemd, tests/system-packages.txt)")
    return str(path)


def units_for(exe: Path, directory: Path) -> list[Path]:
    """The units with ExecStart on `exe` (verify checks the program exists)."""
    paths = []
    for unit in sorted(UNITS.glob("zmq-exporter.*")):
        text = unit.read_text()
        if unit.suffix == ".service":
            assert UNIT_EXEC in text
            text = text.replace(UNIT_EXEC, str(exe))
        (directory / unit.name).write_text(text)
        paths.append(directory / unit.name)
    return paths


def unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    text = re.sub(r"\\\n\s*", " ", path.read_text())  # continuation lines joined
    parser.read_string(text)
    return parser


def verify(units: list[Path]) -> str:
    """`systemd-analyze verify`: it exits 0 on unknown keys and bad values (only warns), so
    any line about the units fails too."""
    done = subprocess.run(
        [systemd_tool("systemd-analyze"), "verify", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return "\n".join([f"exit {done.returncode}", *lines]) if done.returncode or lines else ""


def test_systemd_units_verify(venv: Path, tmp_path: Path) -> None:
    units = units_for(venv / "bin" / "zmq-exporter", tmp_path)
    assert verify(units) == ""
    # The check catches what it is relied on for: a misspelt hardening key, a bad value.
    for wrong in ("NoNewPrivilegs=yes", "NoNewPrivileges=maybe"):
        bad = tmp_path / "bad"
        bad.mkdir(exist_ok=True)
        bad_units = [bad / u.name for u in units]
        for src, dst in zip(units, bad_units, strict=True):
            dst.write_text(src.read_text().replace("NoNewPrivileges=yes", wrong))
        assert f"{bad}/zmq-exporter.service:" in verify(bad_units), wrong


def test_systemd_service_is_hardened(venv: Path, tmp_path: Path) -> None:
    service = unit(UNITS / "zmq-exporter.service")["Service"]
    expected = {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "RuntimeDirectory": "zmq-exporter",  # relay ipc sockets: /run/zmq-exporter
        "LimitNOFILE": "65536",
        "CapabilityBoundingSet": "",
    }
    assert {k: service.get(k) for k in expected} == expected
    exec_start = service["ExecStart"].split()
    assert exec_start == [
        UNIT_EXEC,
        "--config.file=/etc/zmq-exporter/config.yml",
        "--web.systemd-socket",
    ]
    socket_unit = unit(UNITS / "zmq-exporter.socket")["Socket"]
    assert socket_unit["ListenStream"] == DEFAULT_LISTEN.lstrip(":")
    # The relay's documented default ipc path is inside the RuntimeDirectory.
    assert "ipc:///run/zmq-exporter/" in (ROOT / "docs" / "relay.md").read_text()
    # systemd's own offline review: exposure at most 2.0 of 10 ("OK"; 1.4 measured).
    (service_file,) = [
        u for u in units_for(venv / "bin" / "zmq-exporter", tmp_path) if u.suffix == ".service"
    ]
    analyze = systemd_tool("systemd-analyze")
    done = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=20", str(service_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr


def test_limit_nofile_fits_10000_sockets_with_two_endpoints(tmp_path: Path) -> None:
    """LimitNOFILE is the fd budget of 10,000 monitored sockets with two endpoints each: the
    daemon's own start check (--config.check's) passes at the unit's limit and refuses the
    same config at half of it. In process: the limit cannot be raised here (hard 20,000)."""
    lines = ["limits: {max_sockets: 10000, max_series: 2000000}", "sockets:"]
    for i in range(10_000):
        port = 20_000 + i
        lines.append(
            f"  - {{name: s{i}, type: DEALER, connect: "
            f"['tcp://127.0.0.1:{port}', 'tcp://127.0.0.2:{port}']}}"
        )
    config = tmp_path / "big.yml"
    config.write_text("\n".join(lines) + "\n")
    specs = load_config(str(config)).sockets
    limit = int(unit(UNITS / "zmq-exporter.service")["Service"]["LimitNOFILE"])
    need = specs_fds(specs)
    assert need == 50_000
    assert fd_budget_problem(BASE_FDS, need, fd_reserve(), limit=limit) is None
    assert fd_budget_problem(BASE_FDS, need, fd_reserve(), limit=limit // 2) is not None


def test_systemd_service_exec_start_runs_socket_activated(venv: Path, tmp_path: Path) -> None:
    """The service's ExecStart, with the config path replaced, started by
    systemd-socket-activate (socket passing as systemd does it, Accept=no): the daemon
    serves /metrics on the passed socket."""
    activate = systemd_tool("systemd-socket-activate")
    config = tmp_path / "config.yml"
    shutil.copy(ROOT / "config" / "zmq-exporter.yml", config)
    service = unit(UNITS / "zmq-exporter.service")["Service"]
    argv = [
        str(venv / "bin" / "zmq-exporter") if a == UNIT_EXEC else a
        for a in service["ExecStart"].replace("/etc/zmq-exporter/config.yml", str(config)).split()
    ]
    port = free_port()
    proc = subprocess.Popen(
        [activate, f"--listen=127.0.0.1:{port}", "--", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:

        def serving() -> bool:
            assert proc.poll() is None, f"exited {proc.returncode}: {proc.communicate()[0]!r}"
            try:
                text = http_get(f"http://127.0.0.1:{port}/metrics", timeout=10)
            except OSError:
                return False
            return all(f'socket="{name}"' in text for name in DEFAULT_SOCKETS)

        wait_until(serving, timeout=30, interval=0.1, what="the socket-activated service")
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=15)[0]
    assert proc.returncode == 0 and b"Traceback" not in out, out


def test_units_are_documented() -> None:
    text = (ROOT / "deploy" / "README.md").read_text()
    for needle in ("systemd/zmq-exporter.service", "systemd/zmq-exporter.socket", "docker"):
        assert needle in text, needle


# ---- the units under a real systemd (PID 1 of a podman container)

# procps: /bin/kill, which ExecReload runs (in every standard Debian install, not in minbase)
SYSTEMD_PACKAGES = "systemd,systemd-sysv,procps,python3,python3-venv"


def systemd_rootfs(work: Path) -> Path:
    """Debian bookworm minbase with systemd and python3 (debootstrap from the machine's apt
    mirror), kept as a tar between runs in the image tests' cache, named by its inputs."""
    from test_deploy_docker import base_cache, debian_mirror

    mirror = debian_mirror()
    key = hashlib.sha256(f"bookworm\0minbase\0{SYSTEMD_PACKAGES}\0{mirror}".encode())
    archive = base_cache() / f"debian-bookworm-systemd-{key.hexdigest()[:16]}.tar"
    rootfs = work / "rootfs"
    if not archive.is_file():
        debootstrap = shutil.which("debootstrap")
        if debootstrap is None:
            missing_tool("debootstrap")
            raise AssertionError("unreachable")  # missing_tool skips or fails
        fresh = work / "fresh"
        run(
            [
                debootstrap,
                "--variant=minbase",
                f"--include={SYSTEMD_PACKAGES}",
                "bookworm",
                fresh,
                mirror,
            ],
            timeout=900,
        )
        archive.parent.mkdir(parents=True, exist_ok=True)
        partial = archive.with_name(f"{archive.name}.{os.getpid()}.partial")
        run(["tar", "-C", fresh, "-cf", partial, "."], timeout=300)
        partial.rename(archive)  # a run cut short leaves no half archive
        shutil.rmtree(fresh)
    rootfs.mkdir()
    run(["tar", "-C", rootfs, "-xf", archive], timeout=300)
    return rootfs


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_units_run_under_a_real_systemd(dists: Dists, venv: Path, tmp_path: Path) -> None:
    """The units as shipped, in a container whose PID 1 is systemd 252 (podman as root,
    --privileged: the service's sandboxing needs mount namespaces, without it systemd fails
    the start with 226/NAMESPACE), no network but its own loopback: the socket listens, the
    first connection starts the service, which serves the config at /etc/zmq-exporter/ as a
    dynamic user with no capabilities, NoNewPrivileges, a seccomp filter, a read-only /etc
    and /opt and a writable /run/zmq-exporter; `systemctl reload` reloads, `stop` exits 0."""
    podman = shutil.which("podman")
    if os.geteuid() != 0 or podman is None or shutil.which("runc") is None:
        missing_tool("root with podman and runc (tests/system-packages.txt)")
        return
    rootfs = systemd_rootfs(tmp_path)
    short: Path | None = None
    try:
        wheels = rootfs / "wheels"
        run([venv / "bin" / "pip", "download", "--quiet", "--dest", wheels, dists.wheel])
        clean = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        run(["chroot", rootfs, "python3", "-m", "venv", "/opt/zmq-exporter"], env=clean)
        pip: list[str | Path] = ["chroot", rootfs, "/opt/zmq-exporter/bin/pip", "install"]
        pip += ["--quiet", "--no-index"]
        run([*pip, "--find-links", "/wheels", "zmq-exporter"], env=clean)
        config = rootfs / "etc" / "zmq-exporter" / "config.yml"
        config.parent.mkdir()
        shutil.copy(ROOT / "config" / "zmq-exporter.yml", config)
        config.chmod(0o644)
        for unit_file in UNITS.glob("zmq-exporter.*"):
            shutil.copy(unit_file, rootfs / "etc" / "systemd" / "system")
        run(["chroot", rootfs, "systemctl", "enable", "zmq-exporter.socket"], env=clean)

        # podman refuses a runroot path longer than 50 characters: a short temp dir.
        short = Path(tempfile.mkdtemp(prefix="zx-systemd-"))
        engine: list[str | Path] = [podman, "--root", short / "storage"]
        engine += ["--runroot", short / "run", "--storage-driver", "vfs"]
        name = f"zmq-exporter-systemd-{os.getpid()}"
        start: list[str | Path] = ["run", "-d", "--name", name, "--privileged"]
        start += ["--systemd=always", "--network", "none", "--runtime", "runc"]
        start += ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
        run([*engine, *start, "--rootfs", rootfs, "/sbin/init"], timeout=120)
        try:

            def inside(*argv: str, timeout: float = 60) -> str:
                return run([*engine, "exec", name, *argv], timeout=timeout)

            scrape = (
                "import urllib.request; print(urllib.request.urlopen("
                "'http://127.0.0.1:19555/metrics', timeout=5).read().decode())"
            )

            def metrics() -> str:
                done = subprocess.run(
                    [*map(str, engine), "exec", name, "python3", "-c", scrape],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                # The web server answers before the sockets exist: wait for all three.
                if done.returncode or not all(
                    f'socket="{n}"' in done.stdout for n in DEFAULT_SOCKETS
                ):
                    return ""
                return done.stdout

            wait_until(metrics, timeout=120, interval=1, what="systemd's socket and the sockets")
            pid = inside("systemctl", "show", "-p", "MainPID", "--value", "zmq-exporter").strip()
            assert pid not in ("", "0"), pid
            status = dict(
                line.split(":", 1) for line in inside("cat", f"/proc/{pid}/status").splitlines()
            )
            uid = int(status["Uid"].split()[0])
            assert 61184 <= uid <= 65519, status["Uid"]  # systemd's DynamicUser range
            assert status["NoNewPrivs"].strip() == "1"
            assert status["Seccomp"].strip() == "2"
            assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
            owner = inside("stat", "-c", "%u %a", "/run/zmq-exporter").split()
            assert owner == [str(uid), "755"], owner
            # In the service's own mount namespace: only /run/zmq-exporter is writable.
            probe = "for d in /etc /opt /var /run/zmq-exporter; do touch $d/w 2>/dev/null "
            probe += "&& echo $d; done"
            writable = inside("nsenter", "-t", pid, "-m", "sh", "-c", probe).split()
            assert writable == ["/run/zmq-exporter"], writable
            inside("systemctl", "reload", "zmq-exporter")
            wait_until(
                lambda: "config reloaded" in inside("journalctl", "-u", "zmq-exporter"),
                timeout=30,
                what="the reload in the journal",
            )
            inside("systemctl", "stop", "zmq-exporter.service")
            shown = inside(
                "systemctl", "show", "-p", "Result", "-p", "ExecMainStatus", "zmq-exporter"
            )
            assert "Result=success" in shown and "ExecMainStatus=0" in shown, shown
            journal = inside("journalctl", "-u", "zmq-exporter")
            assert "Traceback" not in journal, journal
        finally:
            subprocess.run([*map(str, engine), "rm", "-f", "-t", "10", name], timeout=120)
            subprocess.run([*map(str, engine), "system", "reset", "-f"], timeout=120)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
        if short is not None:
            shutil.rmtree(short, ignore_errors=True)
