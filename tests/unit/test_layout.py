"""The package's boundaries, as docs/design.md's module map states them: only rucio/ imports
rucio, only butler/ imports lsst, only slurm.py runs a Slurm command, and no module imports
another that imports it back (the flow goes one way)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "dac_upload"
SLURM_COMMANDS = {"sbatch", "squeue", "sacct", "scontrol", "sinfo", "scancel"}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def _absolute_imports(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _package_imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules ``name`` imports (at the top or inside a function)."""
    is_package = (PKG.parent / name.replace(".", "/") / "__init__.py").exists()
    package = name if is_package else name.rsplit(".", 1)[0]   # what "." stands for
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            out |= {t for t in [target, *(f"{target}.{a.name}" for a in node.names)]
                    if t in known}
    return out - {name}


def test_only_rucio_imports_rucio_and_only_butler_imports_lsst() -> None:
    for name, tree in _modules().items():
        imported = _absolute_imports(tree)
        if not name.startswith("dac_upload.rucio."):
            assert "rucio" not in imported, name
        if not name.startswith("dac_upload.butler."):
            assert "lsst" not in imported, name


def test_only_slurm_py_runs_slurm_commands() -> None:
    for name, tree in _modules().items():
        if name == "dac_upload.slurm":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.List) and node.elts and isinstance(node.elts[0], ast.Constant):
                assert node.elts[0].value not in SLURM_COMMANDS, (name, node.elts[0].value)


def test_no_import_cycle() -> None:
    mods = _modules()
    graph = {name: _package_imports(name, tree, set(mods)) for name, tree in mods.items()}
    # a package's __init__ is not a step of the flow: importing dac_upload.x.y goes through
    # dac_upload.x, which imports nothing of its own
    seen: dict[str, int] = {}   # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            assert seen.get(nxt) != 1, f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in seen:
                visit(nxt, [*path, node])
        seen[node] = 2

    for name in sorted(graph):
        if name not in seen:
            visit(name, [])


def test_the_module_map_lists_every_module() -> None:
    """docs/design.md's module map and the package's files agree, both ways."""
    import re

    text = (PKG.parent / "docs" / "design.md").read_text(encoding="utf-8")
    table = text[text.index("## Module map"):]
    table = table[:table.index("\n\n", table.index("| Module |"))]
    listed = {name for row in table.splitlines()[2:] if row.startswith("| ")
              for name in re.findall(r"`([\w/]+\.py)`", row.split("|")[1])}
    files = {str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if p.name != "__init__.py"}
    assert listed == files, (sorted(files - listed), sorted(listed - files))


def test_no_test_file_name_is_in_both_layers() -> None:
    """pytest imports test files by their base name: one in tests/unit and one in
    tests/integration with the same name stop CI at collection ("import file mismatch")."""
    tests = PKG.parent / "tests"
    unit = {p.name for p in (tests / "unit").glob("test_*.py")}
    integration = {p.name for p in (tests / "integration").glob("test_*.py")}
    assert not unit & integration, sorted(unit & integration)
