"""The ring attack of docs/settlement.md: 10 Sybil identities pay each other round and round.

With limits grown from gross earnings a ring raised every member's limit by half of
what it moved, each fraud window. Limits now grow from *net* earnings from other
proven identities, so the ring's members stay at the base limit and the ring as a
whole can never owe more than ``10 x base_limit`` (what its 10 proofs of work bought).
"""

from __future__ import annotations

from settlement_fixtures import NOW_MS, World, key, pid, policy, receipt, transfer

from protocols.ledger import IdentityProof, solve_pow

BASE = 1_000
WINDOW = 60_000
RING = [key(500 + i) for i in range(10)]


def ring_world() -> World:
    world = World(policy(base_limit=BASE, fraud_window_ms=WINDOW, max_limit=10**9))
    for k in RING:
        nonce = solve_pow(pid(k), world.pol.pow_bits, max_tries=1 << 20)
        assert nonce is not None
        for led in [*world.ledgers, world.view]:
            assert led is not None
            led.ingest_identity_proof(IdentityProof(pid(k), nonce))
    return world


def test_a_ten_identity_ring_cannot_grow_its_credit() -> None:
    world = ring_world()
    view = world.view
    assert view is not None
    seqs = {pid(k): 0 for k in RING}
    now, job, moved = NOW_MS, 0, 0
    for _round in range(6):  # six fraud windows of wash trading
        for i, payer in enumerate(RING):
            payee = RING[(i + 1) % len(RING)]
            # Each member tries to move as much as its limit allows, then more.
            for amount in (view.credit_limit(pid(payer), now) + BASE, BASE):
                job += 1
                r = receipt(payer, payee, amount, job)
                t = transfer(payer, r, seqs[pid(payer)] + 1, time_ms=now)
                if world.certify(t, r, now) is not None:
                    seqs[pid(payer)] += 1
                    moved += amount
        now += WINDOW  # every payment so far is out of escrow
        for k in RING:
            # Gross earnings grow every round; the limit does not.
            assert view.credit_limit(pid(k), now) == BASE
    assert moved >= 6 * len(RING) * BASE  # the ring did trade
    debt = -sum(min(0, view.balance(pid(k))) for k in RING)
    assert debt <= len(RING) * BASE  # the bound: what its identities cost
    gross = [view.earned(pid(k), now) for k in RING]
    assert min(gross) >= 5 * BASE  # under the old rule each limit would be >= 3.5 x base
    assert all(
        world.pol.limit(earned=g, has_identity=True, banned=False) >= 3 * BASE for g in gross
    )


def test_net_earnings_from_an_honest_payer_still_grow_the_limit() -> None:
    world = ring_world()
    view = world.view
    assert view is not None
    honest, member = key(600), RING[0]
    for led in [*world.ledgers, view]:
        assert led is not None
        led.ingest_identity_proof(
            IdentityProof(pid(honest), solve_pow(pid(honest), world.pol.pow_bits) or 0)
        )
    r = receipt(honest, member, 800, 1)
    assert world.certify(transfer(honest, r, 1), r) is not None
    later = NOW_MS + WINDOW
    assert view.net_earned(pid(member), later) == 800
    assert view.credit_limit(pid(member), later) == BASE + 400
    # Paying it on to a ring mate spends the net earning: the limit falls back.
    r2 = receipt(member, RING[1], 800, 2)
    assert world.certify(transfer(member, r2, 1, time_ms=later), r2, later) is not None
    assert view.credit_limit(pid(member), later) == BASE
