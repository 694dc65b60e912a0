"""The typed errors of edge_models.

Every message says what was expected and what came, so the person (or remote
requester) reading it can act without a traceback.
"""

from __future__ import annotations


class EdgeModelError(Exception):
    """Base of every error raised by ``edge_models``."""


class ModelNotFound(EdgeModelError):
    """No model in the registry matches the reference (name, cid or cid prefix)."""


class AmbiguousModelRef(ModelNotFound):
    """A cid prefix matches more than one model; give more characters."""


class InvalidModel(EdgeModelError):
    """A file cannot be admitted to the registry (not ONNX, too big, external data, ...)."""


class InvalidInput(EdgeModelError):
    """Inputs do not match the model's declared inputs or exceed the input limits."""


class ExecutionFailed(EdgeModelError):
    """ONNX Runtime could not load or run the model."""


class ExecutionTimeout(EdgeModelError):
    """A run (or the wait for an execution slot) took longer than its timeout."""


# The name the rest of the system uses.
Timeout = ExecutionTimeout

__all__ = [
    "AmbiguousModelRef",
    "EdgeModelError",
    "ExecutionFailed",
    "ExecutionTimeout",
    "InvalidInput",
    "InvalidModel",
    "ModelNotFound",
    "Timeout",
]
