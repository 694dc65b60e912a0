"""Rules of referee verdicts and spot-check economics that mutation testing found no test
holding (issue 17). Each test names one rule and fails when that rule is broken
(``python bench/mutation.py --paths protocols/verification.py``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from settlement_fixtures import WITNESS_KEYS, pid, signed_commitment
from test_proofs import EXE, OTHER, REQ, _panel_keys, _verdicts

from protocols.errors import LocalProtocolError
from protocols.proofs import ArbitratedReceipt, FraudProof, sign_referee_result
from protocols.signed import Signed
from protocols.signing import seal
from protocols.verification import (
    EXACT,
    Comparison,
    Tolerance,
    compare_outputs,
    decide,
    judge,
    min_check_probability,
    outputs_digest,
)


def test_verdicts_from_outside_the_panel_are_not_counted() -> None:
    c = signed_commitment(REQ, EXE, 100, 7)
    panel, _ = _panel_keys(c)
    outsiders = [k for k in (*WITNESS_KEYS, OTHER) if pid(k) not in panel]
    off = tuple(
        sign_referee_result(k, c, output_digest=b"o" * 32, verdict="mismatch", time_ms=1)
        for k in outsiders
    )
    assert len(off) >= panel.threshold
    assert decide(c, (*_verdicts(c, "mismatch", 1), *off), panel) is None


def test_verdicts_about_another_commitment_are_not_counted() -> None:
    c = signed_commitment(REQ, EXE, 100, 7)
    other = signed_commitment(REQ, EXE, 100, 8)
    panel, keys = _panel_keys(c)
    about_other = tuple(
        sign_referee_result(k, other, output_digest=b"o" * 32, verdict="mismatch", time_ms=1)
        for k in keys
    )
    assert decide(c, about_other, panel) is None


def test_a_skipped_verdict_does_not_stop_the_count() -> None:
    """An off-panel, foreign or forged verdict first in line is skipped, not the end."""
    c = signed_commitment(REQ, EXE, 100, 7)
    panel, _ = _panel_keys(c)
    good = _verdicts(c, "mismatch", 2)
    outsider = next(k for k in (*WITNESS_KEYS, OTHER) if pid(k) not in panel)
    off = sign_referee_result(outsider, c, output_digest=b"o" * 32, verdict="match", time_ms=1)
    forged = Signed(
        message=good[0].message,
        envelope=seal(OTHER, good[0].envelope.domain, good[0].message.to_body()),
    )
    for first in (off, forged):
        assert isinstance(decide(c, (first, *good), panel), FraudProof)


def test_exactly_threshold_matching_verdicts_decide_for_the_executor() -> None:
    c = signed_commitment(REQ, EXE, 100, 7)
    panel, _ = _panel_keys(c)
    arb = decide(c, _verdicts(c, "match", panel.threshold), panel)
    assert isinstance(arb, ArbitratedReceipt)
    assert decide(c, _verdicts(c, "match", panel.threshold - 1), panel) is None


def test_a_referee_judges_with_the_tolerances_it_is_given() -> None:
    theirs = {"y": np.array([1.0, 2.00001], dtype=np.float32)}
    mine = {"y": np.array([1.0, 2.0], dtype=np.float32)}
    c = replace(signed_commitment(REQ, EXE, 10, 1).message, output_digest=outputs_digest(theirs))
    assert judge(c, theirs, mine) == "match"  # float32 default tolerance
    assert judge(c, theirs, mine, tolerances={"y": EXACT}) == "mismatch"


def test_min_check_probability_is_saved_over_forfeit_capped_at_one() -> None:
    assert min_check_probability(0.5, 1.0) == 0.5  # a forfeit of 1 is a real forfeit
    assert min_check_probability(5.0, 1.0) == 1.0  # never above 1
    assert min_check_probability(1.0, 10.0, referee_catch=0.0) == 1.0  # referees never catch
    assert min_check_probability(1.0, 10.0, referee_catch=0.5) == 0.2


# --- how two outputs are compared (a referee's verdict rests on it) ---------------------------


def _cmp(a: np.ndarray, b: np.ndarray, tol: Tolerance | None = None) -> Comparison:
    return compare_outputs({"y": a}, {"y": b}, default=tol)


ARGMAX = Tolerance("argmax")


def test_argmax_mode_compares_scalars_and_empty_tensors_exactly() -> None:
    one, other = np.array(0.5, np.float32), np.array(0.6, np.float32)
    assert _cmp(one, one.copy(), ARGMAX).agree
    assert not _cmp(one, other, ARGMAX).agree
    for empty in (np.zeros((0, 3), np.float32), np.zeros(0, np.float32)):
        assert _cmp(empty, empty.copy(), ARGMAX).agree
    # One element: its argmax is 0 whatever the value.
    assert _cmp(np.array([0.5], "f4"), np.array([0.6], "f4"), ARGMAX).agree
    vec = np.array([0.1, 0.9], np.float32)
    assert _cmp(vec, np.array([0.2, 0.8], np.float32), ARGMAX).agree  # a 1-d vector: argmax


def test_argmax_mode_takes_the_argmax_over_the_last_axis() -> None:
    a = np.array([[[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]], [[0.2, 0.2, 0.6], [0.3, 0.3, 0.4]]], "f4")
    b = np.array([[[0.0, 0.5, 0.4], [0.9, 0.0, 0.1]], [[0.1, 0.1, 0.8], [0.2, 0.3, 0.5]]], "f4")
    assert _cmp(a, b, ARGMAX).agree


def test_integers_compare_exactly_even_under_a_loose_close_tolerance() -> None:
    a = np.array([10, 20], np.int64)
    assert not _cmp(a, np.array([10, 21], np.int64), Tolerance("close", rtol=0.5, atol=5)).agree


def test_exact_mode_treats_nan_in_the_same_place_as_equal() -> None:
    a = np.array([1.0, np.nan], np.float32)
    assert _cmp(a, a.copy(), EXACT).agree
    assert not _cmp(a, np.array([np.nan, 1.0], np.float32), EXACT).agree


def test_an_infinity_against_a_finite_value_is_reported_as_such() -> None:
    got = _cmp(np.array([np.inf, 1.0], np.float32), np.array([3e38, 1.0], np.float32))
    assert not got.agree and "infinities differ" in got.reason


def test_the_relative_tolerance_scales_with_the_magnitude() -> None:
    tol = Tolerance("close", rtol=1e-3, atol=1e-5)
    assert _cmp(np.array([1000.0]), np.array([1000.5]), tol).agree
    assert not _cmp(np.array([1.0]), np.array([1.5]), tol).agree


def test_a_difference_equal_to_the_bound_agrees_and_the_reason_says_by_how_much() -> None:
    tol = Tolerance("close", rtol=0.0, atol=0.5)
    assert _cmp(np.array([1.0]), np.array([1.5]), tol).agree
    got = _cmp(np.array([0.0, 0.0]), np.array([0.0, 1.0]), tol)
    assert not got.agree and "1 of 2" in got.reason and "worst by 0.5" in got.reason


def test_different_output_names_say_so() -> None:
    got = compare_outputs({"y": np.zeros(1)}, {"z": np.zeros(1)})
    assert not got.agree and "names differ" in got.reason


def test_every_tolerance_mode_can_be_made_and_limits_are_finite_and_non_negative() -> None:
    for mode in ("close", "exact", "argmax"):
        assert Tolerance(mode).mode == mode  # type: ignore[arg-type]
    for bad in ({"mode": "loose"}, {"rtol": float("inf")}, {"atol": float("nan")}, {"rtol": -1}):
        with pytest.raises(LocalProtocolError):
            Tolerance(**bad)  # type: ignore[arg-type]
    assert Tolerance(rtol=0.0, atol=0.0).rtol == 0.0
