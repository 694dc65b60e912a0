"""Tensor limit rules that mutation testing found no test holding (issue 17)."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.tensor import TensorLimits, decode_tensors, encode_tensors


def test_tensor_limits_are_non_negative_ints_and_zero_is_allowed() -> None:
    assert TensorLimits(max_tensors=0).max_tensors == 0
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(LocalProtocolError):
            TensorLimits(max_rank=bad)  # type: ignore[arg-type]


def _wire(names: list[str], rank: int = 1) -> dict[str, object]:
    shape = [1] * rank
    return encode_tensors({n: np.zeros(shape, np.float32) for n in names})


def test_decode_tensors_caps_are_inclusive() -> None:
    """Exactly max_tensors tensors, rank exactly max_rank and names of exactly 256 characters
    are accepted; one more of any is refused."""
    limits = TensorLimits(max_tensors=3, max_rank=4)
    assert len(decode_tensors(_wire(["a", "b", "c"]), limits=limits)) == 3
    assert decode_tensors(_wire(["a"], rank=4), limits=limits)["a"].ndim == 4
    assert decode_tensors(_wire(["n" * 256]), limits=limits)
    for bad in (_wire(["a", "b", "c", "d"]), _wire(["a"], rank=5), _wire(["n" * 257])):
        with pytest.raises(RemoteProtocolError):
            decode_tensors(bad, limits=limits)


def test_the_element_cap_is_inclusive_and_counts_real_elements() -> None:
    limits = TensorLimits(max_elements=4)
    assert decode_tensors(encode_tensors({"x": np.zeros(4, np.float32)}), limits=limits)
    assert decode_tensors(encode_tensors({"x": np.zeros((1, 1, 1), np.float32)}), limits=limits)
    with pytest.raises(RemoteProtocolError):
        decode_tensors(encode_tensors({"x": np.zeros(5, np.float32)}), limits=limits)


def test_a_bool_tensor_holds_only_bytes_0_and_1() -> None:
    wire = encode_tensors({"b": np.array([True, False])})
    for byte in (b"\x02", b"X"):
        bad = {"b": {**wire["b"], "data": b"\x01" + byte}}
        with pytest.raises(RemoteProtocolError):
            decode_tensors(bad)
