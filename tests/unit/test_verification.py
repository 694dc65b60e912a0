"""Output comparison with dtype-fitting tolerance, spot-check choice, referee judging."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from settlement_fixtures import key, signed_commitment

from protocols.errors import LocalProtocolError, ValidationError
from protocols.verification import (
    Tolerance,
    compare_outputs,
    detection_probability,
    judge,
    min_check_probability,
    outputs_digest,
    should_spot_check,
    tolerance_for,
)


def test_default_tolerances_fit_the_dtype() -> None:
    assert tolerance_for("float32").mode == "close"
    assert tolerance_for(np.dtype("float16")).rtol > tolerance_for("float32").rtol
    for dt in ("int8", "int64", "uint8", "bool"):
        assert tolerance_for(dt).mode == "exact"


def test_float_noise_agrees_but_real_changes_do_not() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 16)).astype(np.float32)
    noisy = (a * (1 + 1e-5 * rng.standard_normal(a.shape))).astype(np.float32)
    assert compare_outputs({"y": a}, {"y": noisy}).agree
    wrong = a.copy()
    wrong[2, 3] += 0.5
    result = compare_outputs({"y": a}, {"y": wrong})
    assert not result.agree and "1 of 64" in result.reason


def test_integers_are_exact() -> None:
    a = np.arange(10, dtype=np.int64)
    b = a.copy()
    assert compare_outputs({"ids": a}, {"ids": b}).agree
    b[4] += 1
    assert not compare_outputs({"ids": a}, {"ids": b}).agree


def test_argmax_mode_ignores_confidence_changes() -> None:
    a = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], dtype=np.float32)
    b = np.array([[0.0, 0.9, 0.1], [0.6, 0.1, 0.3]], dtype=np.float32)
    assert not compare_outputs({"p": a}, {"p": b}).agree
    assert compare_outputs({"p": a}, {"p": b}, default=Tolerance("argmax")).agree
    c = b[:, ::-1].copy()
    assert not compare_outputs({"p": a}, {"p": c}, default=Tolerance("argmax")).agree


def test_shape_dtype_names_nan_and_inf() -> None:
    f = np.array([1.0, np.nan, np.inf], dtype=np.float32)
    assert compare_outputs({"y": f}, {"y": f.copy()}).agree
    assert not compare_outputs({"y": f}, {"y": np.array([1.0, 0.0, np.inf], np.float32)}).agree
    assert not compare_outputs({"y": f}, {"y": np.array([1.0, np.nan, -np.inf], np.float32)}).agree
    assert not compare_outputs({"y": f}, {"y": f.astype(np.float64)}).agree
    assert not compare_outputs({"y": f}, {"y": f[:2]}).agree
    assert not compare_outputs({"y": f}, {"z": f}).agree


@settings(max_examples=100)
@given(st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=20))
def test_comparison_is_symmetric_and_reflexive(values: list[float]) -> None:
    a = np.array(values, dtype=np.float32)
    b = (a * np.float32(1.0004)).astype(np.float32)
    assert compare_outputs({"y": a}, {"y": a}).agree
    assert compare_outputs({"y": a}, {"y": b}).agree == compare_outputs({"y": b}, {"y": a}).agree


def test_spot_check_choice_is_a_pure_function() -> None:
    assert should_spot_check(0.05, 0.01, is_first_lease_job=False)
    assert not should_spot_check(0.05, 0.5, is_first_lease_job=False)
    assert should_spot_check(0.0, 0.99, is_first_lease_job=True)
    assert not should_spot_check(0.0, 0.0, is_first_lease_job=False)
    with pytest.raises(LocalProtocolError):
        should_spot_check(1.5, 0.1, is_first_lease_job=False)
    with pytest.raises(LocalProtocolError):
        should_spot_check(0.5, 1.0, is_first_lease_job=False)


@settings(max_examples=50)
@given(st.floats(0.001, 1.0))
def test_spot_check_rate_matches_p(p: float) -> None:
    draws = [(i + 0.5) / 2000 for i in range(2000)]  # an even grid stands in for uniform draws
    rate = sum(should_spot_check(p, d, is_first_lease_job=False) for d in draws) / len(draws)
    assert abs(rate - p) <= 1 / 1000


def test_economics() -> None:
    assert detection_probability(0.05, 1) == pytest.approx(0.05)
    assert detection_probability(0.05, 100) == pytest.approx(1 - 0.95**100)
    assert detection_probability(0.05, 100) > 0.99
    assert min_check_probability(1.0, 100.0) == pytest.approx(0.01)
    assert min_check_probability(1.0, 0.0) == 1.0


def test_judge_checks_the_forwarded_outputs_first() -> None:
    mine = {"y": np.array([1.0, 2.0], dtype=np.float32)}
    theirs = {"y": np.array([1.0, 2.00001], dtype=np.float32)}
    wrong = {"y": np.array([1.0, 3.0], dtype=np.float32)}
    req, exe = key(1), key(2)

    def commitment_for(outputs: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
        c = signed_commitment(req, exe, 10, 1)
        from dataclasses import replace

        return replace(c.message, output_digest=outputs_digest(outputs))

    assert judge(commitment_for(theirs), theirs, mine) == "match"
    assert judge(commitment_for(wrong), wrong, mine) == "mismatch"
    with pytest.raises(ValidationError):
        judge(commitment_for(theirs), wrong, mine)
