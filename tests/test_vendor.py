"""Each patch of a vendor's internals holds on the versions it was checked on: pyproject.toml pins that range,
and the installed version is in it. An upgrade that leaves the range fails here, on purpose: read the patch
again (pipeline/vendor.py says where), then widen the range in both places."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from pipeline import vendor

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, list[SpecifierSet]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for group in project["optional-dependencies"].values() for r in group]
    out: dict[str, list[SpecifierSet]] = {}
    for r in reqs:
        out.setdefault(r.name, []).append(r.specifier)
    return out


@pytest.mark.parametrize("dist", sorted(vendor.PATCHES))
def test_the_installed_version_is_in_the_range_the_patch_was_checked_on(dist: str) -> None:
    patch = vendor.PATCHES[dist]
    version = vendor.installed(dist)
    assert version is not None, f"{dist} is not installed"
    assert Version(version) in SpecifierSet(patch.checked), (
        f"{dist} {version} is outside {patch.checked}: read {patch.where} ({patch.what}) again against it")
    assert vendor.within(dist)
    assert (ROOT / patch.where).is_file()


@pytest.mark.parametrize("dist", sorted(vendor.PATCHES))
def test_pyproject_pins_the_same_range(dist: str) -> None:
    pins = _pins()
    checked = SpecifierSet(vendor.PATCHES[dist].checked)
    assert checked in pins.get(dist, []), f"pyproject.toml pins {dist} as {pins.get(dist)}, not {checked}"
    if dist == "onnxruntime":  # the GPU build shares the module, and so the patch
        assert checked in pins["onnxruntime-gpu"]


def test_outside_the_range_the_patch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    vendor.within.cache_clear()
    monkeypatch.setattr(vendor, "installed", lambda dist: "999.0")
    try:
        assert not vendor.within("kombu")
        with pytest.raises(RuntimeError, match=re.escape(vendor.PATCHES["pinecone"].checked)):
            vendor.require("pinecone")
    finally:
        vendor.within.cache_clear()


def test_every_missing_package_message_names_an_extra_pyproject_has() -> None:
    """An optional package that is missing is named with the extra that installs it (vendor.needs_extra): each
    extra a call names is one of pyproject's, so the advice works."""
    import ast

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = {}
    for pkg in ("api", "workers", "pipeline", "engines", "cli", "deploy"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "needs_extra":
                    arg = node.args[1]
                    assert isinstance(arg, ast.Constant), f"{path}:{node.lineno} names its extra as a literal"
                    named[f"{path.relative_to(ROOT)}:{node.lineno}"] = arg.value
    assert len(named) >= 4 and set(named.values()) <= extras, named
    assert vendor.needs_extra("X needs y", "gpu") == "X needs y: pip install 'imgsearch[gpu]'"
