"""Spot checks: run a job again on another executor, referee a disagreement.

``SpotChecker.check(result, spec, wire)`` (single jobs) and
``second_opinion`` + ``referee`` (lease jobs, see ``peer.market.lease``): the
same inputs go to a second executor (off the checked job's referee panel when
one of those bids); on disagreement the claims go to their referee panels
(``peer.market.referee.arbitrate``); a ``FraudProof`` bans the offender here
at once (``Bans.proven_cheaters``) and goes to settlement through
``on_fraud_proof``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from peer.market.auction import Auctions, Bans, InferResult
from peer.market.clock import Clock, system_clock
from peer.market.jobspec import JobSpec
from peer.market.referee import Claim, SpotChecks, arbitrate
from protocols import requester as rq
from protocols.committee import CommitteeRule, RefereePanel
from protocols.proofs import FraudProof, referee_panel
from protocols.receipt import ResultCommitment
from protocols.signed import Signed
from protocols.tensor import TensorLimits
from protocols.verification import compare_outputs

log = logging.getLogger(__name__)

REFEREE_MIN_S = 5.0  # arbitration gets at least this long, even past the job's deadline
REFEREE_MAX_S = 20.0

RuleSource = Callable[[], CommitteeRule | None]  # the network's rule (None: settlement off)
OpenReferee = Callable[[str, float], Awaitable[Any]]  # (referee, until) -> stream
FraudSink = Callable[[FraudProof], Awaitable[None]]


class SpotChecker:
    def __init__(
        self,
        *,
        peer_id: str,
        auctions: Auctions,
        bans: Bans,
        rule: RuleSource,
        open_referee: OpenReferee,
        limits: TensorLimits,
        sampler: SpotChecks,
        on_fraud_proof: FraudSink | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self.peer_id = peer_id
        self.auctions = auctions
        self.bans = bans
        self.rule = rule
        self.open_referee = open_referee
        self.limits = limits
        self.sampler = sampler
        self.on_fraud_proof = on_fraud_proof
        self.clock = clock

    def referees_for(self, commitment: Signed[ResultCommitment]) -> RefereePanel | None:
        """The referee panel of an executor's commitment to our job, drawn under the current
        checkpoint (None when settlement is off)."""
        rule = self.rule()
        return None if rule is None else referee_panel(rule, commitment, rule.panel_cp)

    async def check(self, result: InferResult, spec: JobSpec, wire: Any) -> InferResult:
        """Run the job again on another executor (not on the job's referee panel if another
        one bids); on disagreement the referees decide, and the honest result is returned."""
        if result.receipt is None:
            result.spot_check = "not checked: it ran on this peer's own executor"
            return result
        c = result.receipt.commitment.message
        check = await self.second_opinion(
            spec, wire, c.job_id, result.executor, commitment=result.receipt.commitment
        )
        if isinstance(check, str):
            result.spot_check = check
            return result
        verdict = compare_outputs(result.outputs, check.outputs)
        if verdict.agree:
            result.spot_check = "agree"
            return result
        log.warning(
            "spot check: %s and %s disagree: %s", result.executor, check.executor, verdict.reason
        )
        assert check.receipt is not None  # second opinions are never local
        claims = [
            Claim(result.receipt.commitment, result.wire),
            Claim(check.receipt.commitment, check.wire),
        ]
        proofs, why = await self.referee(claims, wire, verdict.reason, spec.until)
        cheaters = {p.offender for p in proofs}
        honest = check if result.executor in cheaters else result
        honest.fraud_proofs, honest.spot_check = proofs, why
        return honest

    async def second_opinion(
        self,
        spec: JobSpec,
        wire: Any,
        job_id: bytes,
        executor: str,
        *,
        commitment: Signed[ResultCommitment] | None = None,
    ) -> InferResult | str:
        """The same inputs as a fresh job on another executor: off the checked job's referee
        panel (known from the executor's ``commitment``) if one of those bids, else (small
        swarms, or no commitment given) any other; or why not. Never our own executor: a
        local run has no commitment a referee could judge."""
        spec = spec.unchecked()
        panel = None if commitment is None else self.referees_for(commitment)
        if panel is not None:
            try:
                return await self.auctions.one_job(
                    spec, wire, banned={executor, self.peer_id, *panel.members}
                )
            except rq.MarketFailure as exc:
                if self.clock() >= spec.until:
                    return f"not checked: {exc}"
        try:
            return await self.auctions.one_job(spec, wire, banned={executor, self.peer_id})
        except rq.MarketFailure as exc:
            return f"not checked: {exc}"

    async def referee(
        self, claims: list[Claim], wire: Any, reason: str, until: float
    ) -> tuple[list[FraudProof], str]:
        """The disagreeing claims go to their referee panels; a FraudProof bans its executor
        (here at once, everywhere once settlement spreads it). Returns the proofs and what
        happened, for ``spot_check``."""
        rule = self.rule()
        if rule is None:
            return [], f"{reason}; not refereed: no committee rule (settlement is off)"
        cp = rule.panel_cp
        panels = [referee_panel(rule, c.commitment, cp) for c in claims]
        budget = min(REFEREE_MAX_S, max(REFEREE_MIN_S, until - self.clock()))
        evidence = await arbitrate(
            self.open_referee, claims, wire, panels, limits=self.limits, wait_s=budget
        )
        proofs = [e for e in evidence if isinstance(e, FraudProof)]
        for proof in proofs:
            log.warning(
                "fraud proven against %s (job %s)",
                proof.offender,
                proof.commitment.message.job_id.hex()[:12],
            )
            self.bans.proven_cheaters.add(proof.offender)
            if self.on_fraud_proof is not None:
                try:
                    await self.on_fraud_proof(proof)
                except Exception as exc:  # our ban stands; the ledger may learn it by sync
                    log.warning("could not store the fraud proof: %s", exc)
        if not proofs:
            return [], f"{reason}; referees did not decide"
        cheaters = ", ".join(sorted({p.offender for p in proofs}))
        return proofs, f"{reason}; referees proved {cheaters} wrong"
