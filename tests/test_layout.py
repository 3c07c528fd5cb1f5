"""The packages import one way (docs/architecture.md): read from every module's AST, not grepped, so an import
inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "workers", "pipeline", "engines", "cli", "bench", "deploy", "tests", "standins")
# package -> what it must not import (the domain imports no edge, and no edge reaches into another)
FORBIDDEN = {
    "pipeline": {"api", "workers", "cli", "fastapi", "starlette", "celery"},
    "workers": {"api", "cli"},
    "api": {"engines", "cli"},
    "engines": {"api", "workers"},
    "bench": {"tests"},
}


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """Every module ``path`` imports (absolute names; relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(root).with_suffix("").parts[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            name = ".".join(p for p in (base, node.module or "") if p)
            out.append((node.lineno, name))
    return out


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for pkg, banned in FORBIDDEN.items():
        for path in sorted((root / pkg).rglob("*.py")):
            for line, name in imports(path, root):
                if name.split(".")[0] in banned:
                    found.append(f"{path.relative_to(root)}:{line} imports {name}")
    return found


def test_every_package_imports_only_what_it_may() -> None:
    assert violations() == []


def test_the_walk_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    # the checker itself, on a made-up tree: a nested and a relative import are both seen, an allowed one is not
    (tmp_path / "pipeline" / "jobs").mkdir(parents=True)
    (tmp_path / "pipeline" / "jobs" / "probe.py").write_text(
        "import numpy\nfrom . import keys\ndef f():\n    from api import main\n    from ...workers import tasks\n")
    got = violations(tmp_path)
    assert got == ["pipeline/jobs/probe.py:4 imports api", "pipeline/jobs/probe.py:5 imports workers"]


def test_every_top_level_package_is_known() -> None:
    tops = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert tops <= set(PACKAGES), tops - set(PACKAGES)


# the Redis client calls that carry a job's life: outside pipeline/jobs/commands.py no product module makes them
_SCRIPTED = {"register_script", "eval", "evalsha", "execute_command"}


def redis_scripts_outside_commands(root: Path = ROOT) -> list[str]:
    found = []
    for pkg in ("pipeline", "api", "workers", "deploy", "cli"):
        for path in sorted((root / pkg).rglob("*.py")):
            if path.relative_to(root).as_posix() == "pipeline/jobs/commands.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _SCRIPTED:
                    found.append(f"{path.relative_to(root)}:{node.lineno} calls {node.func.attr}")
    return found


def test_only_the_command_layer_runs_redis_scripts(tmp_path: Path) -> None:
    assert redis_scripts_outside_commands() == []
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "rogue.py").write_text("def f(r):\n    return r.eval('return 1', 0)\n")
    assert redis_scripts_outside_commands(tmp_path) == ["pipeline/rogue.py:2 calls eval"]
