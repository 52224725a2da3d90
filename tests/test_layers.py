"""Who may import whom (see docs/architecture.md). Checked from the source, statically."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ALLOWED = {
    "config": {"pydantic", "lmt.config"},
    "drivers": {"lmt.config", "lmt.drivers", "pymodbus", "serial"},
    "control": {"lmt.control", "numpy", "numba"},
    "analytics": {"lmt.analytics", "lmt.control", "numpy", "numba"},
    "firmware_sim": {"lmt.config", "lmt.firmware_sim", "pymodbus", "numpy", "serial"},
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def allowed(name: str, ok: set[str]) -> bool:
    top = name.split(".")[0]
    if top in sys.stdlib_module_names or top == "__future__":
        return True
    return any(name == a or name.startswith(a + ".") for a in ok)


def test_layer_directions() -> None:
    bad = []
    for folder, ok in ALLOWED.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            bad += [f"{f.relative_to(ROOT)} imports {n}" for n in imports_of(f)
                    if not allowed(n, ok)]
    assert not bad, "\n".join(bad)


def test_no_relative_import_escapes_a_package() -> None:
    for folder in ("config", "drivers", "control", "analytics", "firmware_sim", "agent"):
        for f in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.ImportFrom):
                    assert node.level <= 1, f"{f}: relative import above its package"


# --- lmt.control is pure ----------------------------------------------------------------------
# Decisions are functions of their inputs and state; time is an input. So no module of the clock,
# of files, network, storage, processes, threads, signals, randomness or logging (pure code
# reports through the records it returns), no other lmt package, no clock read and no builtin
# I/O or code execution. A module is banned with its submodules (`os` bans `os.path`); the
# names are top-level modules, so `select` is the stdlib's and `lmt.control.select` is allowed.

BANNED_IN_CONTROL = frozenset({
    "time", "asyncio", "threading", "multiprocessing", "subprocess", "signal", "select",
    "os", "io", "pathlib", "shutil", "socket", "sqlite3", "urllib", "http",
    "random", "logging",
    "sqlite_utils", "paho", "pymodbus", "serial", "pydantic",
})
# Fully qualified: however the file spells them (`dt.datetime.now`, `D.now` after
# `from datetime import datetime as D`), references resolve to these names.
CLOCK_READS = frozenset({
    "datetime.datetime.now", "datetime.datetime.utcnow", "datetime.datetime.today",
    "datetime.date.today",
    "time.time", "time.time_ns", "time.monotonic", "time.monotonic_ns", "time.perf_counter",
    "time.perf_counter_ns", "time.process_time", "time.process_time_ns",
})
BANNED_BUILTINS = frozenset({"open", "print", "input", "exec", "eval"})
DYNAMIC_IMPORTS = frozenset({"importlib.import_module", "importlib.__import__", "__import__",
                             "builtins.__import__"})
_SCOPES = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef,
           ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def banned_module(name: str, package: str = "lmt.control") -> bool:
    """Whether a module of ``package`` (one of the pure packages) may not import ``name``: the
    impure modules, and every other lmt package (lmt.analytics may use lmt.control's types,
    never the reverse)."""
    if name.split(".")[0] in BANNED_IN_CONTROL:
        return True
    top = ".".join(package.split(".")[:2])
    if name == top or name.startswith(top + "."):
        return False
    if top == "lmt.analytics" and (name == "lmt.control" or name.startswith("lmt.control.")):
        return False
    return name.startswith("lmt.")


class _PurityChecker(ast.NodeVisitor):
    """Finds impure imports and calls in one module of package `package`. Names are resolved
    through the file's own imports, scope by scope (a parameter named `open` is not the builtin;
    `from . import time` is `lmt.control.time`); a name bound nowhere stands for itself."""

    def __init__(self, package: str) -> None:
        self.package = package
        self.found: list[tuple[int, str]] = []
        self.scopes: list[tuple[bool, dict[str, str | None]]] = []  # (is a class, name -> import)

    def report(self, node: ast.AST, what: str) -> None:
        self.found.append((getattr(node, "lineno", 0), what))

    def absolute(self, module: str | None, level: int, package: str | None = None) -> str | None:
        if level == 0:
            return module
        parts = (package or self.package).split(".")
        if level - 1 >= len(parts):
            return None
        base = ".".join(parts[:len(parts) - level + 1])
        return f"{base}.{module}" if module else base

    def bindings(self, scope: ast.AST) -> dict[str, str | None]:
        """The names `scope` binds: to the qualified name they import, or to None (shadowing)."""
        bound: dict[str, str | None] = {}
        outer: set[str] = set()

        def bind(name: str, target: str | None = None) -> None:
            if bound.get(name) is None:  # an import wins over any other binding: be strict
                bound[name] = target

        todo = list(ast.iter_child_nodes(scope))
        while todo:
            node = todo.pop()
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                bind(node.id)
            elif isinstance(node, ast.arg):
                bind(node.arg)
            elif isinstance(node, ast.Global | ast.Nonlocal):
                outer.update(node.names)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    top = a.name.split(".")[0]
                    bind(a.asname or top, a.name if a.asname else top)
            elif isinstance(node, ast.ImportFrom):
                module = self.absolute(node.module, node.level) or "<beyond the top package>"
                for a in node.names:
                    if a.name != "*":
                        bind(a.asname or a.name, f"{module}.{a.name}")
                    else:  # what `*` brings that matters here: `from datetime import *` binds date
                        for name in CLOCK_READS:
                            if name.startswith(f"{module}."):
                                inner = name.removeprefix(f"{module}.").split(".")[0]
                                bind(inner, f"{module}.{inner}")
            elif isinstance(node, ast.ExceptHandler | ast.MatchAs | ast.MatchStar) and node.name:
                bind(node.name)
            elif isinstance(node, ast.MatchMapping) and node.rest:
                bind(node.rest)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                bind(node.name)
            if not isinstance(node, _SCOPES):
                todo.extend(ast.iter_child_nodes(node))
        return {k: v for k, v in bound.items() if k not in outer}

    def scoped(self, node: ast.AST) -> None:
        self.scopes.append((isinstance(node, ast.ClassDef), self.bindings(node)))
        self.generic_visit(node)
        self.scopes.pop()

    visit_Module = visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = scoped
    visit_ClassDef = visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = scoped

    def lookup(self, name: str) -> str | None:
        innermost = len(self.scopes) - 1
        for i in range(innermost, -1, -1):
            is_class, bound = self.scopes[i]
            if is_class and i != innermost:  # a class body is no enclosing scope of its methods
                continue
            if name in bound:
                return bound[name]
        return name  # a builtin, or a global bound nowhere in the file

    def qualname(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.lookup(node.id)
        if isinstance(node, ast.Attribute):
            base = self.qualname(node.value)
            return None if base is None else f"{base}.{node.attr}"
        return None

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if banned_module(a.name, self.package):
                self.report(node, f"imports {a.name}: `{ast.unparse(node)}`")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = self.absolute(node.module, node.level)
        if module is None:
            self.report(node, f"relative import beyond the top package: `{ast.unparse(node)}`")
        elif banned_module(module, self.package):
            self.report(node, f"imports {module}: `{ast.unparse(node)}`")
        else:
            for a in node.names:
                if banned_module(f"{module}.{a.name}", self.package):
                    self.report(node, f"imports {module}.{a.name}: `{ast.unparse(node)}`")

    def check_reference(self, node: ast.Name | ast.Attribute) -> None:
        name, spelled = self.qualname(node), ast.unparse(node)
        if name in CLOCK_READS:
            self.report(node, f"reads the clock: {name}" + (f" (`{spelled}`)" if spelled != name else ""))
        elif name in BANNED_BUILTINS or name in {f"builtins.{b}" for b in BANNED_BUILTINS}:
            builtin = name.removeprefix("builtins.")
            self.report(node, f"uses builtin {builtin}" + (f" (`{spelled}`)" if spelled != builtin else ""))

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.check_reference(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.ctx, ast.Load):
            self.check_reference(node)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if self.qualname(node.func) in DYNAMIC_IMPORTS:
            args = dict(zip(("name", "package"), node.args, strict=False))
            args |= {k.arg: k.value for k in node.keywords if k.arg}
            name, package = args.get("name"), args.get("package")
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                self.report(node, f"dynamic import of a computed name: `{ast.unparse(node)}`")
            elif not name.value.startswith("."):
                if banned_module(name.value, self.package):
                    self.report(node, f"imports {name.value}: `{ast.unparse(node)}`")
            elif not (isinstance(package, ast.Constant) and isinstance(package.value, str)):
                self.report(node, f"relative dynamic import from a computed package: `{ast.unparse(node)}`")
            else:  # import_module(".x", "package")
                relative = name.value.lstrip(".")
                module = self.absolute(relative or None, len(name.value) - len(relative), package.value)
                if module is None or banned_module(module, self.package):
                    self.report(node, f"imports {module or name.value}: `{ast.unparse(node)}`")
        self.generic_visit(node)


def impurities(source: str, package: str = "lmt.control", filename: str = "<source>"
               ) -> list[tuple[int, str]]:
    """(line, what) for every impure import, clock read and builtin I/O in `source`, a module
    of `package`."""
    checker = _PurityChecker(package)
    checker.visit(ast.parse(source, filename))
    return sorted(checker.found)


def package_of(f: Path, folder: str = "control") -> str:
    return ".".join(("lmt", folder, *f.relative_to(ROOT / folder).parent.parts))


@pytest.mark.parametrize("folder", ["control", "analytics"])
def test_the_pure_packages_are_pure(folder: str) -> None:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files
    bad = [f"{f.relative_to(ROOT)}:{line}: {what}" for f in files
           for line, what in impurities(f.read_text(encoding="utf-8"), package_of(f, folder),
                                        str(f))]
    assert not bad, f"lmt.{folder} must be pure (docs/architecture.md):\n" + "\n".join(bad)


IMPURE = [
    "import time",
    "import os.path",
    "from os import path",
    "from time import monotonic",
    "import select",
    "import asyncio, math",
    "def f():\n    import socket\n",
    "import logging\nlog = logging.getLogger(__name__)",
    "import paho.mqtt.client as mqtt",
    "from pydantic import BaseModel",
    "from http import client",
    "import urllib.request",
    "from lmt.agent import cli",
    "import lmt.drivers",
    "from lmt import agent",
    "from .. import config",
    "import datetime as dt\ndt.datetime.now()",
    "import datetime\ndatetime.datetime.utcnow()",
    "from datetime import date\ndate.today()",
    "from datetime import datetime as D\nD.now()",
    "from datetime import *\ndatetime.now()",
    "from datetime import datetime\ndef f():\n    return datetime.today()",
    "from dataclasses import field\nfrom datetime import datetime\nx = field(default_factory=datetime.now)",
    "time.time()",
    "importlib.import_module('socket')",
    "import importlib\nimportlib.import_module('os.path')",
    "from importlib import import_module as im\nim(name='lmt.agent.cli')",
    "__import__('subprocess')",
    "import importlib\nname = 'os'\nimportlib.import_module(name)",
    "import importlib\nimportlib.import_module('..agent', 'lmt.control')",
    "open('f')",
    "print('x')",
    "input()",
    "exec('x = 1')",
    "eval('1')",
    "import builtins\nbuiltins.open('f')",
    "xs = list(map(print, [1]))",
]
PURE = [
    "from lmt.control.select import select_shed",
    "from lmt.control import select\nselect.select_shed([], 0)",
    "from . import select",
    "from . import time\ntime.time()",
    "from datetime import date, datetime, UTC\ndatetime.fromtimestamp(x, tz=UTC)",
    "from datetime import date\ndate.fromisoformat('2024-01-01')",
    "import math",
    "import numpy as np\nfrom numba import njit",
    "from collections.abc import Mapping\nfrom dataclasses import dataclass, field",
    "def step(state, inputs):\n    return inputs.now, state.time()",
    "def f(open, print):\n    return open(1), print",
    "class C:\n    def input(self):\n        return self.input()",
    "import importlib\nimportlib.import_module('.select', 'lmt.control')",
    "import importlib",
]


@pytest.mark.parametrize("source", IMPURE)
def test_the_purity_checker_flags(source: str) -> None:
    assert impurities(source), source


@pytest.mark.parametrize("source", PURE)
def test_the_purity_checker_passes(source: str) -> None:
    assert impurities(source) == []


@pytest.mark.parametrize(("source", "impure"), [
    ("from lmt.control.jsonstate import Json", False),
    ("from lmt.analytics.intervals import step", False),
    ("from lmt.control import supervisor", False),
    ("from lmt.analytics import intervals", False),
    ("import lmt.agent.messages", True),
    ("import sqlite3", True),
])
def test_the_analytics_package_may_use_control_but_nothing_else(source: str, impure: bool) -> None:
    assert bool(impurities(source, "lmt.analytics")) is impure, source


def test_the_purity_checker_reports_every_violation_with_its_line() -> None:
    source = ("import math\n"
              "import time as t\n"
              "from datetime import datetime as D\n"
              "\n"
              "def f(x):\n"
              "    from os import path\n"
              "    return t.monotonic() + D.now().hour + x\n")
    assert impurities(source) == [
        (2, "imports time: `import time as t`"),
        (6, "imports os: `from os import path`"),
        (7, "reads the clock: datetime.datetime.now (`D.now`)"),
        (7, "reads the clock: time.monotonic (`t.monotonic`)"),
    ]


def test_the_command_line_parser_loads_no_simulator_or_numpy() -> None:
    """`lmt platform …`, `lmt optout`, `lmt --help`: the parser alone must not pull in the
    simulators (numpy, pymodbus's server): on a Pi that is a third of a second and memory."""
    import subprocess

    code = ("import sys, lmt.agent.cli as c; c.build_parser(); "
            "print(sorted(m for m in sys.modules if m == 'numpy' or m.startswith("
            "('lmt.firmware_sim.server', 'pymodbus.server', 'numba'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip()
    assert out == "[]", out
