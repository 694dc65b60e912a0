"""Input checks before execution: names, dtypes, shapes, symbolic dims, caps."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_models.errors import InvalidInput
from edge_models.limits import InputLimits
from edge_models.runtime import synthetic_inputs, validate_inputs
from edge_models.spec import ModelEntry, TensorSpec

ENTRY = ModelEntry(
    cid="0" * 64,
    name="m",
    size=1,
    inputs=(
        TensorSpec("ids", "int64", ("batch", "seq")),
        TensorSpec("mask", "int64", ("batch", "seq")),
        TensorSpec("img", "float32", ("batch", 3, None)),
    ),
    outputs=(TensorSpec("y", "float32", ("batch",)),),
    opset=17,
    source="test",
)


def good(batch: int = 2, seq: int = 5, width: int = 7) -> dict[str, Any]:
    return {
        "ids": np.zeros((batch, seq), np.int64),
        "mask": np.ones((batch, seq), np.int64),
        "img": np.zeros((batch, 3, width), np.float32),
    }


def test_valid_inputs_pass() -> None:
    validate_inputs(ENTRY, good())


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 4), st.integers(0, 6), st.integers(0, 6))
def test_any_consistent_binding_passes(batch: int, seq: int, width: int) -> None:
    validate_inputs(ENTRY, good(batch, seq, width))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4))
def test_inconsistent_symbolic_dims_fail(a: int, b: int, seq: int) -> None:
    inputs = good(batch=a, seq=seq)
    inputs["mask"] = np.ones((b, seq), np.int64)
    if a == b:
        validate_inputs(ENTRY, inputs)
    else:
        with pytest.raises(InvalidInput, match="dimension 'batch' is"):
            validate_inputs(ENTRY, inputs)


def _mutate(**changes: Any) -> dict[str, Any]:
    inputs = good()
    for k, v in changes.items():
        if v is None:
            del inputs[k]
        else:
            inputs[k] = v
    return inputs


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        (_mutate(mask=None), r"expects inputs \['ids', 'img', 'mask'\].*missing \['mask'\]"),
        (_mutate(extra=np.zeros(1)), r"unexpected \['extra'\]"),
        (_mutate(ids=np.zeros((2, 5), np.int32)), "'ids' must be int64, got <i4"),
        (_mutate(ids=np.zeros((2, 5), ">i8")), "'ids' must be int64, got >i8"),
        (_mutate(img=np.zeros((2, 3, 7), np.float64)), "'img' must be float32, got <f8"),
        (_mutate(ids=np.zeros((2, 5, 1), np.int64)), r"shape \(batch, seq\) \(rank 2\)"),
        (_mutate(img=np.zeros((2, 4, 7), np.float32)), r"axis 1 is 4, expected 3"),
        (_mutate(mask=np.ones((2, 6), np.int64)), "dimension 'seq' is 5 in input 'ids' but 6"),
        (_mutate(ids=[[1, 2]]), "must be a numpy array, got list"),
    ],
)
def test_each_mismatch_names_what_was_expected(inputs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        validate_inputs(ENTRY, inputs)


def test_not_a_mapping() -> None:
    with pytest.raises(InvalidInput, match="mapping"):
        validate_inputs(ENTRY, [1, 2])  # type: ignore[arg-type]


def test_caps() -> None:
    with pytest.raises(InvalidInput, match="more than 50 elements"):
        validate_inputs(ENTRY, good(), InputLimits(max_elements=50))
    with pytest.raises(InvalidInput, match="more than 100 bytes"):
        validate_inputs(ENTRY, good(), InputLimits(max_total_bytes=100))
    with pytest.raises(InvalidInput, match="rank 3, the limit is 2"):
        validate_inputs(ENTRY, good(), InputLimits(max_rank=2))
    with pytest.raises(InvalidInput, match="3 inputs, the limit is 2"):
        validate_inputs(ENTRY, good(), InputLimits(max_tensors=2))


def test_unknown_rank_accepts_any_shape() -> None:
    entry = ModelEntry("1" * 64, "u", 1, (TensorSpec("x", "uint8", None),), (), 17, "test")
    for shape in [(), (3,), (1, 2, 3)]:
        validate_inputs(entry, {"x": np.zeros(shape, np.uint8)})


def test_synthetic_inputs_are_valid() -> None:
    validate_inputs(ENTRY, synthetic_inputs(ENTRY))
    assert synthetic_inputs(ENTRY, dim=4)["img"].shape == (4, 3, 4)
