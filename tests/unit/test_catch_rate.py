"""Issue 10's acceptance "20 % of the executors return perturbed outputs under default
settings: each is caught at a rate of at least p, loses its escrow, and no honest executor
is accused", in process and deterministic: the real protocol objects (signed commitments,
receipts, witness-certified payments on four honest witnesses' ledgers, seeded spot-check
draws at the default p, referee panels, verdicts, ``decide``, fraud proofs) without hosts.

Five executors serve the model; one of them (20 %) adds 1.0 to its outputs and bids cheapest,
so it runs every job it is not banned from. A job is checked exactly when the requester's
draw is below p (``SpotChecks``, default ``Config.spot_check``), so the catch rate per job
the cheater runs is p as long as every check of its job ends in a fraud proof: that is what
this test pins down, with the ledgers' reaction. The swarm version with real hosts is
``bench/catch_rate.py`` (figures in docs/settlement.md) and
tests/integration/test_spot_check_fraud.py.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np

from peer.config import Config
from peer.market.referee import SpotChecks
from protocols.proofs import ArbitratedReceipt, FraudProof, referee_panel, sign_referee_result
from protocols.receipt import Receipt, ResultCommitment, commit, content_digest
from protocols.signed import Signed
from protocols.verification import compare_outputs, decide, judge, outputs_digest
from tests.unit.settlement_fixtures import NOW_MS, WITNESS_KEYS, World, key, pid, policy, transfer

HONEST = WITNESS_KEYS  # four honest executors; they are also the witnesses and referees
CHEATER, REQUESTER = key(810), key(811)
KEY_OF = {pid(k): k for k in [*HONEST, CHEATER]}
PRICE = 500_000
SEED = 7  # any seed works; this one draws below p first at draw 9, keeping the test short
X = np.arange(4, dtype=np.float32)


def run_model(executor: str, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    out = inputs["x"] + inputs["y"]
    return {"z": out + 1.0 if executor == pid(CHEATER) else out}


def claim(executor: str, job: int, inputs: dict[str, Any]) -> tuple[Signed[ResultCommitment], Any]:
    outputs = run_model(executor, inputs)
    c = ResultCommitment(
        job_id=hashlib.sha256(b"catch-%d" % job).digest()[:16],
        requester=pid(REQUESTER),
        executor=executor,
        model_cid=hashlib.sha256(b"tiny_add").hexdigest(),
        input_digest=content_digest(job),
        output_digest=outputs_digest(outputs),
        price=PRICE,
        compute_ms=1,
    )
    return commit(KEY_OF[executor], c), outputs


def referee(
    world: World, signed: Signed[ResultCommitment], outputs: Any, inputs: Any, t: int
) -> FraudProof | ArbitratedReceipt | None:
    """Every member of the claim's panel recomputes (with its own runtime) and signs."""
    panel = referee_panel(world.rul, signed, 0)
    verdicts = [
        sign_referee_result(
            KEY_OF[m],
            signed,
            output_digest=outputs_digest(run_model(m, inputs)),
            verdict=judge(signed.message, outputs, run_model(m, inputs)),
            time_ms=t,
        )
        for m in panel.members
    ]
    return decide(signed, verdicts, panel)


def test_a_perturbing_executor_is_caught_at_rate_p_loses_its_escrow_and_nobody_else() -> None:
    p = Config().spot_check
    assert p == 0.05  # the default under test
    world = World(policy(genesis=frozenset({pid(REQUESTER)}), base_limit=10**12))
    sampler = SpotChecks(random.Random(SEED))
    draws = random.Random(SEED)
    banned: set[str] = set()
    seq, wrong_answers, proofs = 0, 0, []
    cheater_jobs = 0
    first_hit = next(i for i in range(100) if draws.random() < p)
    assert first_hit == 8
    draws = random.Random(SEED)
    for job in range(first_hit + 4):
        t = NOW_MS + job * 100
        inputs = {"x": X, "y": X + job}
        first = min(
            (pid(k) for k in [CHEATER, *HONEST] if pid(k) not in banned),
            key=lambda e: (e != pid(CHEATER), e),  # the cheater bids cheapest
        )
        cheater_jobs += first == pid(CHEATER)
        signed, outputs = claim(first, job, inputs)
        checked = sampler.want(p)
        assert checked == (draws.random() < p)  # checked exactly on a draw below p
        taken = (signed, outputs)
        if checked:
            panel = referee_panel(world.rul, signed, 0)
            second = min(pid(k) for k in HONEST if pid(k) != first and pid(k) not in panel)
            signed2, outputs2 = claim(second, 1000 + job, inputs)
            if not compare_outputs(outputs, outputs2).agree:
                found = [
                    referee(world, s, o, inputs, t)
                    for s, o in ((signed, outputs), (signed2, outputs2))
                ]
                frauds = [e for e in found if isinstance(e, FraudProof)]
                # Every check of the cheater's job proves it; the honest claim is upheld.
                assert [f.offender for f in frauds] == [pid(CHEATER)]
                assert isinstance(found[1], ArbitratedReceipt)
                proofs += frauds
                banned |= {f.offender for f in frauds}
                for ledger in [*world.ledgers, world.view]:
                    assert ledger is not None
                    for f in frauds:
                        ledger.ingest_fraud_proof(FraudProof.from_bytes(f.to_bytes()))
                taken = (signed2, outputs2)
        wrong_answers += not np.array_equal(taken[1]["z"], inputs["x"] + inputs["y"])
        r = Receipt.create(REQUESTER, taken[0])
        seq += 1
        assert world.certify(transfer(REQUESTER, r, seq, time_ms=t), r, now_ms=t) is not None
    # Caught at its first check (the 9th job it ran, the first draw below p), then never
    # awarded again: the three jobs after it ran on honest executors.
    assert cheater_jobs == first_hit + 1 and len(proofs) == 1
    assert wrong_answers == first_hit  # the unchecked jobs before the catch, then none
    cheater = pid(CHEATER)
    for ledger in [*world.ledgers, world.view]:
        assert ledger is not None
        assert ledger.is_banned(cheater)
        # All its payouts were still in escrow: every one is reversed.
        assert ledger.forfeited().get(cheater) == first_hit * PRICE
        assert ledger.balance(cheater) == 0
        assert not any(ledger.is_banned(pid(k)) for k in HONEST)
        assert ledger.balance(pid(REQUESTER)) == -(seq - first_hit) * PRICE
