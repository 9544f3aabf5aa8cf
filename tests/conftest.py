"""Shared fixtures for the asymlora Python test suite."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cli_path() -> Path:
    """The ``asymlora`` console script installed next to this interpreter."""
    path = Path(sys.executable).parent / "asymlora"
    if not path.exists():
        pytest.skip(f"console script not installed at {path}")
    return path
