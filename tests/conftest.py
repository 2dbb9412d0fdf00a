"""Shared fixtures: where the shared test captures live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """``../shared/corpus`` beside the checkout (or ``$STM_CORPUS``); skip when absent."""
    path = Path(os.environ.get("STM_CORPUS", REPO.parent / "shared" / "corpus"))
    if not path.is_dir():
        pytest.skip(f"shared test corpus not found at {path} (set STM_CORPUS)")
    return path
