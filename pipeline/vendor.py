"""The vendors: the optional packages, each installed by an extra (``needs_extra`` says which), and the
internals we patch, each with the version range it was checked on.

A patch of a library's internals holds only for the versions someone read and tested it against, so each
sits behind a range that ``pyproject.toml`` pins too, and ``tests/test_vendor.py`` fails when the installed
version leaves it: a vendor upgrade is a deliberate step (read the patch again, widen the range), never a
surprise. At run time, outside its range, a patch is not applied where it can be left out (the code says what
it falls back to), and a warning names it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Patch:
    dist: str  # the distribution's name on PyPI
    checked: str  # the version range the patch was read and tested against (PEP 440)
    where: str
    what: str


PATCHES = {p.dist: p for p in (
    Patch("kombu", ">=5.7,<5.8", "workers/broker.py",
          "the Redis channel neither restores nor acknowledges on a connection already torn down"),
    Patch("pinecone", ">=10.2,<10.3", "pipeline/stores/pinecone_store.py",
          "the data-plane HTTP client is rebuilt with our retry policy (pinecone._internal)"),
    Patch("onnxruntime", ">=1.32,<1.33", "engines/ort.py",
          "one process-wide intra-op thread pool (onnxruntime.capi._pybind_state.set_global_thread_pool_sizes)"),
)}


def needs_extra(what: str, extra: str) -> str:
    """The one way to say an optional package is missing: what needs it, and the extra that installs it."""
    return f"{what}: pip install 'imgsearch[{extra}]'"


def installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@cache
def within(dist: str) -> bool:
    """Whether the installed ``dist`` is in the range its patch was checked on (warns once if not)."""
    patch, version = PATCHES[dist], installed(dist)
    ok = version is not None and Version(version) in SpecifierSet(patch.checked)
    if not ok:
        log.warning("%s %s is outside %s, the range %s's patch was checked on (%s)", dist, version, patch.checked,
                    patch.where, patch.what)
    return ok


def require(dist: str) -> None:
    """RuntimeError where the installed ``dist`` is outside its patch's range (the caller falls back)."""
    if not within(dist):
        raise RuntimeError(f"{dist} {installed(dist)} is outside {PATCHES[dist].checked}; the patch is left out")
