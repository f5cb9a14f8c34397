"""`zmq-exporter-instrument [options] COMMAND [ARGS...]`: run an unmodified Python program
with every pyzmq socket instrumented from its creation, in every process it starts.

In the manner of opentelemetry-instrument: the options become environment variables
(exporter/instrument/env.py), bootstrap/ goes first on PYTHONPATH so that every Python
process of the program imports its sitecustomize.py at startup, and COMMAND replaces this
process (exec; found on PATH like a shell would: a script with a python shebang, `python -m
module`, a console script). Forked workers inherit the hooks; spawned children (multiprocessing,
subprocess) inherit the environment and start them again. Each process reports as itself
(relay process id hostname/pid)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from exporter.instrument import env

BOOTSTRAP = Path(__file__).resolve().parent / "bootstrap"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zmq-exporter-instrument",
        description="Run a Python program with every pyzmq socket instrumented from its "
        "creation (library mode in every process; docs/library.md).",
        epilog="Each option sets the environment variable shown; variables already set are "
        "used when an option is not given.",
    )
    for variable, (option, text) in env.VARIABLES.items():
        if option in {"--messages", "--disabled"}:
            parser.add_argument(option, action="store_true", help=f"{text} [{variable}]")
        else:
            parser.add_argument(option, metavar="VALUE", help=f"{text} [{variable}]")
    parser.add_argument("command", help="the program: a script, python, a console script")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    return parser


def environment(options: argparse.Namespace, base: dict[str, str]) -> dict[str, str]:
    out = dict(base)
    for variable, (option, _text) in env.VARIABLES.items():
        value = getattr(options, option.removeprefix("--").replace("-", "_"))
        if value is True:
            out[variable] = "1"
        elif isinstance(value, str):
            out[variable] = value
    env.load(out)  # a bad value stops here, with the variable's name, not in each process
    paths = [str(BOOTSTRAP), *(p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p)]
    out["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return out


def main(argv: list[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    try:
        child_env = environment(options, dict(os.environ))
    except ValueError as err:
        print(f"zmq-exporter-instrument: {err}", file=sys.stderr)
        return 2
    command = options.command
    found = command if os.sep in command else shutil.which(command, path=child_env.get("PATH"))
    if found is None:
        print(f"zmq-exporter-instrument: {command}: command not found", file=sys.stderr)
        return 127
    try:
        os.execve(found, [command, *options.args], child_env)
    except OSError as err:
        print(f"zmq-exporter-instrument: {command}: {err.strerror}", file=sys.stderr)
        return 126
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
