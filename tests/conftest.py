"""Shared test fixtures: paths to the demo model and the data beside the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    path = REPO / "services" / "demo_model"
    if not (path / "config.json").is_file():
        pytest.fail(f"demo model missing at {path}: run scripts/train_demo_model.py")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED
