"""Fixtures for edge_models component tests: a fresh registry and tiny models per test."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/models.py (shared tiny-graph builders) is imported as `tests.models`;
# pytest's default rootdir handling does not put the repository root on sys.path.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from edge_models.registry import Registry  # noqa: E402
from edge_models.runtime import ModelRuntime  # noqa: E402
from edge_models.spec import ModelEntry  # noqa: E402
from tests import models  # noqa: E402


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "data" / "models")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A directory outside the store for source model files."""
    d = tmp_path / "src"
    d.mkdir()
    return d


@pytest.fixture
def add_model(registry: Registry, src: Path) -> ModelEntry:
    return registry.add_file(models.tiny_add_model(src / "add.onnx"), "add")


@pytest.fixture
def runtime(registry: Registry) -> Iterator[ModelRuntime]:
    with ModelRuntime(registry, p50_runs=3) as rt:
        yield rt
