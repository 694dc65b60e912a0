"""Tensor limit rules that mutation testing found no test holding (issue 17)."""

from __future__ import annotations

import pytest

from protocols.errors import LocalProtocolError
from protocols.tensor import TensorLimits


def test_tensor_limits_are_non_negative_ints_and_zero_is_allowed() -> None:
    assert TensorLimits(max_tensors=0).max_tensors == 0
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(LocalProtocolError):
            TensorLimits(max_rank=bad)  # type: ignore[arg-type]
