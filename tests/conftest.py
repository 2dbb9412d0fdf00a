"""Shared pytest fixtures."""

from __future__ import annotations

import os
import subprocess
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


@pytest.fixture
def procs():
    """Subprocesses started by a test; any still running at teardown are killed."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(10)
