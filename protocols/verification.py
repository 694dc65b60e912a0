"""Spot checks and referees: when to check, how to compare outputs, how a dispute ends.

ONNX Runtime gives slightly different floats on different hardware, so
outputs are compared with a tolerance that fits their dtype: ``close``
(symmetric rtol/atol) for floats, ``exact`` for integers and bools, or
``argmax`` (same arg-max along the last axis) when only the decision matters.

Flow (peer/ drives it): with probability p, and always on a lease's first
job (``should_spot_check``), the requester also runs the job on a second
executor outside the job's referee panel; if ``compare_outputs`` says the two
disagree it sends both commitments and claimed outputs to the referee panel
(``protocols.proofs.referee_panel``); each referee recomputes and signs a
``RefereeResult`` using ``judge``; ``decide`` turns a majority of verdicts
into a ``FraudProof`` (loser) or an ``ArbitratedReceipt`` (winner, also what
an executor uses when a requester refuses to accept a correct result).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from protocols.committee import RefereePanel
from protocols.errors import LocalProtocolError, RemoteProtocolError, ValidationError
from protocols.proofs import ArbitratedReceipt, FraudProof, RefereeResult, Verdict
from protocols.receipt import ResultCommitment, content_digest
from protocols.signed import Signed
from protocols.tensor import encode_tensors

Mode = Literal["close", "exact", "argmax"]
Arrays = Mapping[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class Tolerance:
    """How two outputs of one tensor are compared."""

    mode: Mode = "close"
    rtol: float = 1e-3
    atol: float = 1e-5

    def __post_init__(self) -> None:
        if self.mode not in ("close", "exact", "argmax"):
            raise LocalProtocolError(f"unknown tolerance mode {self.mode!r}")
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise LocalProtocolError(f"Tolerance.{name} must be finite and >= 0, got {v}")


# Cross-hardware ONNX Runtime differences: fp16 ~1e-3 relative, fp32 ~1e-5..1e-4
# (reduction order, fused kernels), fp64 tiny. The defaults leave a margin.
_FLOAT_TOLERANCE = {
    "float16": Tolerance("close", rtol=1e-2, atol=1e-3),
    "float32": Tolerance("close", rtol=1e-3, atol=1e-5),
    "float64": Tolerance("close", rtol=1e-7, atol=1e-10),
}
EXACT = Tolerance("exact", 0.0, 0.0)


def tolerance_for(dtype: np.dtype[Any] | str) -> Tolerance:
    """The default tolerance for a dtype: ``close`` for floats, ``exact`` otherwise."""
    return _FLOAT_TOLERANCE.get(np.dtype(dtype).name, EXACT)


@dataclass(frozen=True)
class Comparison:
    agree: bool
    reason: str = ""


def _compare_one(name: str, a: npt.NDArray[Any], b: npt.NDArray[Any], tol: Tolerance) -> str:
    if a.dtype != b.dtype:
        return f"{name}: dtype {a.dtype} vs {b.dtype}"
    if a.shape != b.shape:
        return f"{name}: shape {a.shape} vs {b.shape}"
    if tol.mode == "argmax":
        if a.ndim == 0 or a.size == 0:
            return "" if np.array_equal(a, b) else f"{name}: values differ"
        if not np.array_equal(np.argmax(a, axis=-1), np.argmax(b, axis=-1)):
            return f"{name}: arg-max differs"
        return ""
    if tol.mode == "exact" or a.dtype.kind not in "fc":
        same = np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
        return "" if same else f"{name}: values differ (exact comparison)"
    x, y = a.astype(np.float64), b.astype(np.float64)
    nan_x, nan_y = np.isnan(x), np.isnan(y)
    if not np.array_equal(nan_x, nan_y):
        return f"{name}: NaN positions differ"
    inf = np.isinf(x) | np.isinf(y)
    if not np.array_equal(x[inf], y[inf]):
        return f"{name}: infinities differ"
    finite = ~(nan_x | inf)
    diff = np.abs(x[finite] - y[finite])
    # Symmetric: |a-b| <= atol + rtol * max(|a|, |b|).
    bound = tol.atol + tol.rtol * np.maximum(np.abs(x[finite]), np.abs(y[finite]))
    bad = diff > bound
    if bad.any():
        worst = float((diff - bound)[bad].max())
        return (
            f"{name}: {int(bad.sum())} of {a.size} values out of tolerance (worst by {worst:.3g})"
        )
    return ""


def compare_outputs(
    a: Arrays,
    b: Arrays,
    *,
    tolerances: Mapping[str, Tolerance] | None = None,
    default: Tolerance | None = None,
) -> Comparison:
    """Do two sets of named outputs agree? Per tensor: ``tolerances[name]``, else
    ``default``, else ``tolerance_for(dtype)``."""
    if set(a) != set(b):
        return Comparison(False, f"output names differ: {sorted(a)} vs {sorted(b)}")
    for name in sorted(a):
        tol = (tolerances or {}).get(name) or default or tolerance_for(a[name].dtype)
        reason = _compare_one(name, np.asarray(a[name]), np.asarray(b[name]), tol)
        if reason:
            return Comparison(False, reason)
    return Comparison(True)


def outputs_digest(outputs: Arrays) -> bytes:
    """sha256 of the canonical CBOR wire form of ``outputs`` (the commitment's output digest)."""
    return content_digest(encode_tensors(outputs))


def should_spot_check(probability: float, draw: float, *, is_first_lease_job: bool) -> bool:
    """Check this job? ``draw`` is a uniform random value in [0, 1) supplied by the caller."""
    if not (0.0 <= probability <= 1.0):
        raise LocalProtocolError(f"spot-check probability must be in [0, 1], got {probability}")
    if not (0.0 <= draw < 1.0):
        raise LocalProtocolError(f"draw must be in [0, 1), got {draw}")
    return is_first_lease_job or draw < probability


def judge(
    commitment: ResultCommitment,
    claimed_outputs: Arrays,
    my_outputs: Arrays,
    *,
    tolerances: Mapping[str, Tolerance] | None = None,
    digest: Callable[[Arrays], bytes] = outputs_digest,
) -> Verdict:
    """Referee side: compare the executor's outputs (as the requester forwarded them) with mine.

    Raises ``ValidationError`` when the forwarded outputs are not the ones the
    executor committed to: then there is nothing to judge (the requester, not
    the executor, is lying) and the referee signs nothing.
    """
    if digest(claimed_outputs) != commitment.output_digest:
        raise ValidationError("forwarded outputs do not hash to the commitment's output digest")
    return (
        "match"
        if compare_outputs(claimed_outputs, my_outputs, tolerances=tolerances).agree
        else "mismatch"
    )


def decide(
    commitment: Signed[ResultCommitment],
    results: Iterable[Signed[RefereeResult]],
    panel: RefereePanel,
) -> FraudProof | ArbitratedReceipt | None:
    """Turn referee verdicts on one commitment into evidence, once a panel majority agrees.

    Verdicts that are invalid, off-panel or about another commitment are
    ignored. Returns ``None`` while no verdict has a majority.
    """
    by_verdict: dict[str, dict[str, Signed[RefereeResult]]] = {"match": {}, "mismatch": {}}
    for signed in results:
        r = signed.message
        if r.commitment != commitment.digest or r.referee not in panel or r.cp != panel.cp:
            continue
        try:
            signed.verify()
        except RemoteProtocolError:  # a bad verdict is simply not counted
            continue
        by_verdict[r.verdict][r.referee] = signed
    mismatch, match = by_verdict["mismatch"], by_verdict["match"]
    if len(mismatch) >= panel.threshold:
        chosen = tuple(mismatch[k] for k in sorted(mismatch)[: panel.threshold])
        proof = FraudProof.of(commitment, chosen)
        proof.verify(panel)
        return proof
    if len(match) >= panel.threshold:
        chosen = tuple(match[k] for k in sorted(match)[: panel.threshold])
        arbitrated = ArbitratedReceipt.of(commitment, chosen)
        arbitrated.verify(panel)
        return arbitrated
    return None


# --- the economics, as functions (docs/settlement.md uses them) -------------------------------


def detection_probability(p: float, k: int) -> float:
    """Chance that at least one of ``k`` cheated jobs is spot-checked at rate ``p``."""
    return 1.0 - (1.0 - p) ** k


def min_check_probability(
    cost_saved: float, forfeit: float, *, referee_catch: float = 1.0
) -> float:
    """Smallest p that makes cheating on one job unprofitable: p > saved / (catch * forfeit)."""
    if forfeit <= 0 or referee_catch <= 0:
        return 1.0
    return min(1.0, cost_saved / (referee_catch * forfeit))


__all__ = [
    "EXACT",
    "Comparison",
    "Tolerance",
    "compare_outputs",
    "decide",
    "detection_probability",
    "judge",
    "min_check_probability",
    "outputs_digest",
    "should_spot_check",
    "tolerance_for",
]
