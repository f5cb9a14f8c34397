"""No private name of any OpenTelemetry package is used anywhere in the project: not by the
product (exporter/), the benchmarks (bench/) or the tests. Private names change without
notice between releases, which is what pinned every OpenTelemetry package to one minor
version and broke applications that embed the library.

The check reads the code (`ast`), so formatting, aliases and line breaks do not hide a use:
- importing a module whose dotted path has a private part (`opentelemetry.x._internal`),
  or a private name from an OpenTelemetry module;
- an attribute `_name` read or written on anything that comes from OpenTelemetry: an
  imported module, class or function, what a call of it returns, a name assigned from one
  (followed through assignments), and `self` in a class that subclasses one of them (its
  private members are the base class's);
- `getattr`/`hasattr`/`setattr`/`delattr` with a private name, in a module that imports
  OpenTelemetry.
Dunder names (`__version__`) are public.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import ROOT

ROOTS = ("exporter", "bench", "tests")
TOP = "opentelemetry"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _root(node: ast.expr) -> str | None:
    """The name an expression starts from: `a` of `a.b(c).d[0]`."""
    while True:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute | ast.Subscript):
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Await):
            node = node.value
        else:
            return None


def _targets(node: ast.expr) -> Iterator[str]:
    if isinstance(node, ast.Name):
        yield node.id
    elif isinstance(node, ast.Tuple | ast.List):
        for element in node.elts:
            yield from _targets(element)


def violations(source: str, filename: str = "<code>") -> list[str]:
    """Every use of an OpenTelemetry private name in `source`, as `file:line: what`."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    bound: set[str] = set()  # names that hold something from OpenTelemetry

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != TOP:
                    continue
                if any(_private(part) for part in alias.name.split(".")):
                    report(node, f"import of private module {alias.name}")
                bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] != TOP:
                continue
            if any(_private(part) for part in node.module.split(".")):
                report(node, f"import from private module {node.module}")
            for alias in node.names:
                if _private(alias.name):
                    report(node, f"private name {alias.name} from {node.module}")
                bound.add(alias.asname or alias.name)
    if not bound:
        return found

    # Names assigned from OpenTelemetry things, to a fixed point (scope-insensitive: a
    # name that ever holds one is suspect everywhere in the module).
    changed = True
    while changed:
        changed = False
        for node in ast.walk(tree):
            value: ast.expr | None = None
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                value, targets = node.value, list(node.targets)
            elif isinstance(node, ast.AnnAssign | ast.AugAssign | ast.NamedExpr) and node.value:
                value, targets = node.value, [node.target]
            elif isinstance(node, ast.With | ast.AsyncWith):
                for item in node.items:
                    if item.optional_vars is not None and _root(item.context_expr) in bound:
                        for name in _targets(item.optional_vars):
                            if name not in bound:
                                bound.add(name)
                                changed = True
            elif isinstance(node, ast.For) and _root(node.iter) in bound:
                value, targets = node.iter, [node.target]
            if value is not None and _root(value) in bound:
                for target in targets:
                    for name in _targets(target):
                        if name not in bound:
                            bound.add(name)
                            changed = True

    # Classes built on an OpenTelemetry class: `self` (and `cls`) in them is one.
    subclass_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(_root(b) in bound for b in node.bases):
            for inner in ast.walk(node):
                subclass_lines.add(id(inner))

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = _root(node.value)
            if root in bound or (root in ("self", "cls") and id(node) in subclass_lines):
                report(node, f"private attribute {node.attr} of {root}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and any(_private(part) for part in node.args[1].value.split("."))
        ):
            report(node, f"{node.func.id} of private name {node.args[1].value!r}")
        elif isinstance(node, ast.ClassDef) and any(_root(b) in bound for b in node.bases):
            for member in node.body:
                if isinstance(member, ast.FunctionDef | ast.AsyncFunctionDef) and _private(
                    member.name
                ):
                    report(member, f"override of private method {member.name}")
    return found


def _files() -> Iterator[Path]:
    for top in ROOTS:
        yield from sorted((ROOT / top).rglob("*.py"))
    yield ROOT / "testkit.py"


def test_no_opentelemetry_private_names_anywhere() -> None:
    files = list(_files())
    assert len(files) > 50 and any(f.name == "transport.py" for f in files)
    problems = [
        problem
        for path in files
        for problem in violations(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert not problems, "\n".join(problems)


# What the check must catch: the uses of 44f8c93 (the official exporters' hooks), and the
# ways one might write them.
CAUGHT = [
    "from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import x",
    "import opentelemetry.sdk._logs as logs",
    "from opentelemetry.sdk.metrics import _internal",
    "import opentelemetry.sdk.resources as r\nr._DEFAULT_RESOURCE",
    "from opentelemetry.sdk import resources\nresources.Resource._x",
    (
        "from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (\n"
        "    OTLPMetricExporter as GrpcExporter,\n)\n"
        "class _Grpc(GrpcExporter):\n"
        "    def _translate_data(self, data):\n        return data\n"
    ),
    (
        "from opentelemetry.exporter.otlp.proto.http.metric_exporter import E\n"
        "class H(E):\n"
        "    def send(self, r, t):\n"
        "        self._client._timeout = t\n        return self.export(r)\n"
    ),
    (
        "from opentelemetry.exporter.otlp.proto.http import metric_exporter as m\n"
        "def make():\n    e = m.OTLPMetricExporter()\n    f = e\n    return f._export_batch(1)\n"
    ),
    (
        "from opentelemetry.sdk.metrics import MeterProvider\n"
        "with MeterProvider() as p:\n    p._sdk_config\n"
    ),
    "import opentelemetry\nhasattr(x, '_translate_data')",
    "from opentelemetry import metrics\nmetrics.get_meter_provider()._meters",
]
ALLOWED = [
    "from opentelemetry.metrics import Observation\nclass A:\n    def f(self):\n"
    "        return self._x\n",
    "from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics",
    "import opentelemetry.version\nopentelemetry.version.__version__",
    "import zmq\nzmq._private",  # not OpenTelemetry
    "x = object()\nx._y = 1",
]


@pytest.mark.parametrize("source", CAUGHT)
def test_the_check_catches(source: str) -> None:
    assert violations(source), source


@pytest.mark.parametrize("source", ALLOWED)
def test_the_check_allows(source: str) -> None:
    assert not violations(source), violations(source)
