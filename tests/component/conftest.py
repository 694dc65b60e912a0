"""Fixtures for edge_models component tests: a fresh registry and tiny models per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_models.registry import Registry
from edge_models.runtime import ModelRuntime
from edge_models.spec import ModelEntry
from tests import models


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
