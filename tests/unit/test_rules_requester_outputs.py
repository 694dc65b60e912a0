"""The requester's checks of an executor's outputs (``check_outputs``, ``declared_problem`` in
peer/market/requester.py): untrusted tensors must decode within our limits and be what the
model declares (names, dtypes, ranks, fixed dims) before anything is signed for them.

The mutation run of issue 17 found these unheld (docs/testing.md: the requesters of the
integration tests hold no model, so ``declared_problem`` never ran). Each test fails when
its rule is removed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edge_models.spec import Dim, ModelEntry, TensorSpec
from peer.market.requester import check_outputs, declared_problem
from protocols.tensor import DEFAULT_LIMITS, TensorLimits, encode_tensors

CID = "ab" * 32


def entry(*outputs: tuple[str, str, tuple[Dim, ...] | None]) -> ModelEntry:
    return ModelEntry(
        cid=CID,
        name="m",
        size=1,
        inputs=(TensorSpec("x", "float32", (1, 4)),),
        outputs=tuple(TensorSpec(n, d, s) for n, d, s in outputs),
        opset=17,
        source="test",
    )


Y = entry(("y", "float32", (1, "n", None)))


def arrays(**tensors: Any) -> dict[str, Any]:
    return {k: np.asarray(v) for k, v in tensors.items()}


def test_outputs_that_are_what_the_model_declares_pass() -> None:
    good = arrays(y=np.zeros((1, 3, 2), np.float32))
    assert declared_problem(good, Y) == ""
    ok, reason, decoded = check_outputs({0: encode_tensors(good)}, Y, DEFAULT_LIMITS)
    assert (ok, reason) == (True, "")
    assert list(decoded) == [0]
    np.testing.assert_array_equal(decoded[0]["y"], good["y"])


def test_symbolic_and_unknown_dims_take_any_size() -> None:
    for shape in ((1, 1, 1), (1, 7, 9), (1, 0, 5)):
        assert declared_problem(arrays(y=np.zeros(shape, np.float32)), Y) == ""


def test_a_model_of_unknown_output_rank_takes_any_rank() -> None:
    anyrank = entry(("y", "int64", None))
    for shape in ((), (3,), (2, 2, 2, 2)):
        assert declared_problem(arrays(y=np.zeros(shape, np.int64)), anyrank) == ""


def test_without_a_registry_entry_only_decoding_is_checked() -> None:
    assert declared_problem(arrays(z=np.zeros(2, np.int8)), None) == ""


@pytest.mark.parametrize(
    "outputs",
    [
        {},  # missing
        {"y": np.zeros((1, 3, 2), np.float32), "extra": np.zeros(1, np.float32)},
        {"z": np.zeros((1, 3, 2), np.float32)},  # renamed
        {"y": np.zeros((1, 3, 2), np.float64)},  # dtype
        {"y": np.zeros((1, 3, 2), np.int32)},
        {"y": np.zeros((1, 3), np.float32)},  # rank
        {"y": np.zeros((1, 3, 2, 1), np.float32)},
        {"y": np.zeros((2, 3, 2), np.float32)},  # fixed dim
        {"y": np.zeros((0, 3, 2), np.float32)},
    ],
)
def test_outputs_the_model_does_not_declare_are_refused(outputs: dict[str, Any]) -> None:
    assert declared_problem(outputs, Y) != ""
    ok, reason, decoded = check_outputs({0: encode_tensors(outputs)}, Y, DEFAULT_LIMITS)
    assert not ok
    assert reason.startswith("outputs of job 0: ")
    assert decoded == {}


def test_one_bad_job_of_a_batch_refuses_the_whole_batch() -> None:
    good = encode_tensors(arrays(y=np.zeros((1, 2, 2), np.float32)))
    bad = encode_tensors(arrays(y=np.zeros((3,), np.float32)))
    ok, reason, decoded = check_outputs({0: good, 1: bad, 2: good}, Y, DEFAULT_LIMITS)
    assert (ok, decoded) == (False, {})
    assert reason.startswith("outputs of job 1: ")


def test_outputs_are_decoded_with_the_requesters_limits() -> None:
    """The limits passed in, not the defaults: a job's outputs may be capped lower."""
    wire = encode_tensors(arrays(y=np.zeros((1, 4, 2), np.float32)))
    assert check_outputs({0: wire}, Y, DEFAULT_LIMITS)[0]
    ok, reason, decoded = check_outputs({0: wire}, Y, TensorLimits(max_elements=4))
    assert (ok, decoded) == (False, {})
    assert reason.startswith("outputs of job 0 do not decode: ")


def test_outputs_that_do_not_decode_are_refused_without_a_registry_entry() -> None:
    ok, reason, decoded = check_outputs({3: {"y": {"dtype": "float32"}}}, None, DEFAULT_LIMITS)
    assert (ok, decoded) == (False, {})
    assert reason.startswith("outputs of job 3 do not decode: ")
