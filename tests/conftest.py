"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The shared capture corpus: ``$STM_CORPUS``, else ``shared/corpus`` beside the project."""
    env = os.environ.get("STM_CORPUS")
    path = Path(env) if env else Path(__file__).parents[1].parent / "shared" / "corpus"
    if not path.is_dir():
        pytest.skip(f"shared capture corpus not found at {path} (set STM_CORPUS to its folder)")
    return path
