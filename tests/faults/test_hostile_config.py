"""What ships with the repository gives an attacker nothing: ``.env.example`` holds no usable secret (Flower
refuses its placeholder), and neither the package's floors nor the images' pinned versions allow a release
with a published advisory that these floors name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.version import Version

pytestmark = [pytest.mark.faults, pytest.mark.hostile]

ROOT = Path(__file__).resolve().parents[2]
FLOORS = {"pillow": "12.3", "h11": "0.16", "tornado": "6.5.7"}  # see pyproject.toml for the advisories
SECRET = re.compile(r"(SECRET|PASSWORD|API_KEY|BASIC_AUTH|TOKEN)")


def _env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_env_example_holds_no_usable_secret() -> None:
    env = _env_example()
    secrets = {k: v for k, v in env.items() if SECRET.search(k)}
    assert "IMGSEARCH_FLOWER_BASIC_AUTH" in secrets and "REDDIT_CLIENT_SECRET" in secrets
    assert all(v in ("", "[]") for v in secrets.values()), secrets
    # and Flower, given the example's value, refuses to start
    out = subprocess.run([sys.executable, "-m", "cli.main", "flower"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "IMGSEARCH_FLOWER_BASIC_AUTH": env["IMGSEARCH_FLOWER_BASIC_AUTH"]})
    assert out.returncode != 0 and "IMGSEARCH_FLOWER_BASIC_AUTH" in out.stderr


def test_dependency_floors_and_the_images_pins_are_above_the_advisories() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "docker" / "constraints.txt").read_text(), re.M))
    pins = {k.lower(): v for k, v in pins.items()}
    for name, floor in FLOORS.items():
        assert re.search(rf'"{name}>=([0-9.]+)"', pyproject, re.I), name
        declared = re.search(rf'"{name}>=([0-9.]+)"', pyproject, re.I).group(1)  # type: ignore[union-attr]
        assert Version(declared) >= Version(floor), (name, declared)
        assert Version(pins[name]) >= Version(floor) and Version(version(name)) >= Version(floor), name
    assert "torch" not in pins and "imgsearch" not in pins  # each image takes its own torch build
    for dockerfile in (ROOT / "docker").glob("*.Dockerfile"):
        installs = re.findall(r'pip install [^\n]*"\.\[', dockerfile.read_text())
        assert installs and all("-c docker/constraints.txt" in line for line in installs), dockerfile.name
    # the pins reach every build: the build context is an allowlist, and it names them
    assert "!docker/constraints.txt" in (ROOT / ".dockerignore").read_text().splitlines()
