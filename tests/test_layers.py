"""Who may import whom (see docs/architecture.md). Checked from the source, statically."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ALLOWED = {
    "config": {"pydantic", "lmt.config"},
    "drivers": {"lmt.config", "lmt.drivers", "pymodbus", "serial"},
    "control": {"lmt.control", "numpy", "numba"},
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
    for folder in ("config", "drivers", "control", "firmware_sim", "agent"):
        for f in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.ImportFrom):
                    assert node.level <= 1, f"{f}: relative import above its package"


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
