"""Caps that guard the registry and the runtime against hostile models and inputs."""

from __future__ import annotations

from dataclasses import dataclass, field

from protocols.tensor import TensorLimits

# Inputs of one execution: the same caps as one decoded message of tensors, so
# whatever the wire decoder admits the runtime checks against the same numbers.
InputLimits = TensorLimits
DEFAULT_INPUT_LIMITS = InputLimits()

# Operator domains ONNX Runtime implements itself. Anything else needs a custom
# op library, i.e. native code from the model's author: never loaded.
DEFAULT_ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})


@dataclass(frozen=True)
class ModelLimits:
    """What the registry admits."""

    # protobuf itself cannot hold more than 2 GiB; we stay well below it.
    max_model_bytes: int = 1024 * 1024 * 1024
    allowed_domains: frozenset[str] = field(default=DEFAULT_ALLOWED_DOMAINS)

    def __post_init__(self) -> None:
        if self.max_model_bytes <= 0:
            raise ValueError(f"max_model_bytes must be positive, got {self.max_model_bytes}")


DEFAULT_MODEL_LIMITS = ModelLimits()

__all__ = [
    "DEFAULT_ALLOWED_DOMAINS",
    "DEFAULT_INPUT_LIMITS",
    "DEFAULT_MODEL_LIMITS",
    "InputLimits",
    "ModelLimits",
    "TensorLimits",
]
