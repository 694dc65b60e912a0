"""Settlement over real libp2p hosts: payments certified by 4 witnesses, double spends fail."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from libp2p.peer.id import ID
from settlement_helpers import (
    Node,
    connect_all,
    key,
    make_receipt,
    make_transfer,
    now_ms,
    pid,
    policy,
    rule_for,
    settlement_node,
    wait_for,
)

from peer.ledger_store import read_snapshot, verify_snapshot
from peer.settlement import MAX_FRAME, PROTOCOL_ID, PaymentFailed, SettlementConfig
from protocols.certificate import WitnessVote, sign_vote
from protocols.codec import FrameDecoder, decode, encode, encode_uvarint, frame
from protocols.errors import ValidationError
from protocols.ledger_rpc import Certify, CertifyReply
from protocols.ledger_state import FactKind
from protocols.payment import PaymentSession
from protocols.proofs import EquivocationProof
from protocols.signed import Signed
from protocols.witness import (
    Refuse,
    ReplyVote,
    TransferRequest,
    Witness,
    decode_reply,
)

WITNESS_KEYS = [key(100 + i) for i in range(4)]
RULE = rule_for(WITNESS_KEYS)
POLICY = policy(genesis=frozenset())  # everyone proves an identity (PoW, 4 bits)
PAYER, PAYEE = key(1), key(2)


async def _world(stack: AsyncExitStack, tmp_path: Path, extra: list, **cfg: object) -> list[Node]:
    config = SettlementConfig(sync_interval=0, gossip=False, **cfg)  # type: ignore[arg-type]
    nodes = []
    for n, k in enumerate([*WITNESS_KEYS, *extra]):
        nodes.append(
            await stack.enter_async_context(
                settlement_node(tmp_path / f"n{n}", k, RULE, POLICY, config)
            )
        )
    await connect_all(nodes)
    return nodes


async def test_payment_is_certified_by_the_committee(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        *witnesses, payer, payee = await _world(stack, tmp_path, [PAYER, PAYEE])
        receipts = [make_receipt(PAYER, PAYEE, 100_000, j) for j in range(3)]
        for r in receipts:
            await payee.svc.ingest_receipt(r)  # the executor keeps its receipts too
            await payer.svc.ingest_receipt(r)  # auto_pay: the payer pays in the background
        await wait_for(
            "the payee to hold 3 certificates",
            lambda n: n.svc.balances().get(pid(PAYEE)) == 300_000,
            [payer, payee],
        )
        await wait_for(
            "every witness to see seq 3",
            lambda n: n.svc.ledger.next_seq(pid(PAYER)) == 4,
            witnesses,
        )
        for w in witnesses:
            # Every vote a witness gave is backed by a durable lock.
            assert {(r.account, r.seq) for r in w.store.locks()} <= {
                (pid(PAYER), s) for s in (1, 2, 3)
            }
        assert sum(len(w.store.locks()) for w in witnesses) >= 3 * 3
        assert payer.svc.balances() == {pid(PAYER): -300_000, pid(PAYEE): 300_000}
        assert payer.store.outgoing() == []
        assert payer.svc.unpaid() == []
        # Paying an already paid receipt returns its certificate, no new seq.
        cert = await payer.svc.pay(receipts[1])
        assert cert.seq == 2
    for n in range(6):
        report = verify_snapshot(read_snapshot(tmp_path / f"n{n}"))
        assert report.ok, report.problems


async def test_over_the_credit_limit_fails_and_stays_pending(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        *_, payer, _payee = await _world(stack, tmp_path, [PAYER, PAYEE], auto_pay=False)
        big = make_receipt(PAYER, PAYEE, POLICY.base_limit + 1, 1)
        with pytest.raises(PaymentFailed, match="over-limit") as info:
            await payer.svc.pay(big)
        assert len(info.value.refusals) >= 2
        # The signed transfer is kept: it will be resent unchanged, never replaced.
        [(t, r)] = payer.store.outgoing()
        assert t.message.seq == 1 and r.receipt_id == big.receipt_id
        small = make_receipt(PAYER, PAYEE, 10, 2)
        with pytest.raises(PaymentFailed):
            await payer.svc.pay(small)  # blocked behind seq 1
        assert payer.svc.ledger.next_seq(pid(PAYER)) == 1


class SignEverything(Witness):
    """A byzantine witness: votes for any transfer, never locks."""

    def handle_transfer(self, transfer, receipt, ledger, now_ms):  # type: ignore[no-untyped-def]
        return ReplyVote(sign_vote(self._key, transfer))


async def _ask(
    attacker: Node, witness: Node, t, r
) -> Signed[WitnessVote] | Refuse | EquivocationProof:  # type: ignore[no-untyped-def]
    reply = await attacker.svc.client.call(
        witness.id, Certify(TransferRequest(t, r).to_bytes()), CertifyReply
    )
    return decode_reply(reply.r)


async def test_double_spend_fails_with_a_byzantine_witness(tmp_path: Path) -> None:
    """A payer signs two transfers for seq 1 and plays the committee (one of which signs
    everything) against itself: at most one transfer is ever certified, and it is banned."""
    victim2 = key(3)
    async with AsyncExitStack() as stack:
        nodes = await _world(stack, tmp_path, [PAYER, PAYEE, victim2], auto_pay=False)
        *witnesses, attacker, _payee, _other = nodes
        byz = witnesses[3]
        byz.svc.witness_server.witness = SignEverything(WITNESS_KEYS[3])
        honest = witnesses[:3]
        ra = make_receipt(PAYER, PAYEE, 1000, 1)
        rb = make_receipt(PAYER, victim2, 1000, 2)
        ta, tb = make_transfer(PAYER, ra, 1), make_transfer(PAYER, rb, 1)
        # Round 1: A to honest[0], honest[1] and the byzantine witness; B to honest[2].
        replies_a = {w.id: await _ask(attacker, w, ta, ra) for w in (honest[0], honest[1], byz)}
        replies_b = {w.id: await _ask(attacker, w, tb, rb) for w in (honest[2], byz)}
        # Round 2: B to the ones that saw A (and vice versa).
        replies_b |= {w.id: await _ask(attacker, w, tb, rb) for w in (honest[0], honest[1])}
        replies_a[honest[2].id] = await _ask(attacker, honest[2], ta, ra)

        def votes(replies: dict) -> set[str]:  # type: ignore[type-arg]
            return {w for w, v in replies.items() if isinstance(v, Signed)}

        assert votes(replies_a) == {honest[0].id, honest[1].id, byz.id}  # a quorum for A
        assert votes(replies_b) == {honest[2].id, byz.id}  # B can never reach 3
        for w in (honest[0], honest[1], honest[2]):
            got = replies_b[w.id] if w is not honest[2] else replies_a[w.id]
            assert isinstance(got, EquivocationProof), got
        # Every honest witness has banned the payer (it stored the proof).
        for w in honest:
            assert w.svc.ledger.is_banned(pid(PAYER))
        # No certificate for B exists anywhere, and a later honest transfer is refused.
        rc = make_receipt(PAYER, PAYEE, 10, 3)
        tc = make_transfer(PAYER, rc, 1)
        replies_c = [await _ask(attacker, w, tc, rc) for w in honest]
        assert not any(isinstance(v, Signed) for v in replies_c)


async def test_double_spend_split_committee_gets_no_certificate(tmp_path: Path) -> None:
    """Two transfers for one seq, each sent to half the honest committee first: neither can
    be certified (2 + 2 votes, quorum 3), whatever order the rest arrives in."""
    async with AsyncExitStack() as stack:
        nodes = await _world(stack, tmp_path, [PAYER, PAYEE, key(3)], auto_pay=False)
        *witnesses, attacker, _payee, _other = nodes
        ra, rb = make_receipt(PAYER, PAYEE, 500, 1), make_receipt(PAYER, key(3), 500, 2)
        ta, tb = make_transfer(PAYER, ra, 1), make_transfer(PAYER, rb, 1)
        async with trio.open_nursery() as nursery:  # concurrent, like a real attacker
            for i, w in enumerate(witnesses):
                t, r = (ta, ra) if i % 2 == 0 else (tb, rb)
                nursery.start_soon(_ask, attacker, w, t, r)
        results = {"a": 0, "b": 0}
        for w in witnesses:
            got = await _ask(attacker, w, ta, ra)
            results["a"] += isinstance(got, Signed)
            got = await _ask(attacker, w, tb, rb)
            results["b"] += isinstance(got, Signed)
        assert results == {"a": 2, "b": 2}
        # Each witness locked (durably) exactly one transfer for seq 1.
        for w in witnesses:
            assert len([r for r in w.store.locks() if r.account == pid(PAYER)]) == 1


async def test_payer_crash_after_persisting_resends_the_same_transfer(tmp_path: Path) -> None:
    """The payer stored its signed transfers (three pipelined seqs) and died before any
    witness saw them: on restart the payer task resends exactly those transfers (a new
    signature would be equivocation), and every witness, not only a quorum, learns the
    payer's identity and votes for them (the restarted payer first tried before it was
    connected). Then twenty receipts owed at once are paid in one batch: consecutive
    seqs, one lock fsync per witness for all of them."""
    config = SettlementConfig(sync_interval=0, gossip=False, auto_pay=False)
    rs = [make_receipt(PAYER, PAYEE, 1234, j) for j in (1, 2, 3)]
    async with AsyncExitStack() as stack:
        witnesses = [
            await stack.enter_async_context(
                settlement_node(tmp_path / f"w{i}", k, RULE, POLICY, config)
            )
            for i, k in enumerate(WITNESS_KEYS)
        ]
        async with settlement_node(tmp_path / "payer", PAYER, RULE, POLICY, config) as payer:
            stored = []
            for seq, r in enumerate(rs, start=1):
                await payer.svc.add(r)
                _, persist = PaymentSession.start(PAYER, r, payer.svc.ledger, now_ms(), seq=seq)
                await payer.store.put_outgoing(persist.transfer, r)
                stored.append(persist.transfer.digest)
        # "Restart" with the payer task on: it must finish the stored transfers.
        for w in witnesses:  # a lock is no fact: wake wait_for when one is committed
            put_locks = w.store.put_locks

            async def put_and_notify(records, *, facts=(), put=put_locks, w=w):  # type: ignore[no-untyped-def]
                await put(records, facts=facts)
                w.svc.facts.notify()

            w.store.put_locks = put_and_notify  # type: ignore[method-assign]
        restarted = SettlementConfig(sync_interval=0, gossip=False, auto_pay=True)
        async with settlement_node(tmp_path / "payer", PAYER, RULE, POLICY, restarted) as payer:
            for w in witnesses:
                await payer.peer.connect(w.addr)
            payer.svc.payer.wake()  # the restart found work; connected now, go
            await wait_for(
                "the stored transfers to be certified", lambda n: n.store.outgoing() == [], [payer]
            )
            for seq, digest in enumerate(stored, start=1):
                cert = payer.store.certificate(pid(PAYER), seq)
                assert cert is not None and cert.digest == digest
            assert payer.svc.balances() == {pid(PAYER): -3 * 1234, pid(PAYEE): 3 * 1234}
            # The requests still in flight after a quorum finish on their own: a witness
            # that never got the payer's identity proof would refuse them all (over-limit,
            # credit 0), hidden by the quorum, and the committee would tolerate no fault.
            await wait_for(
                "every witness to learn the payer's identity and vote for all three",
                lambda n: (
                    n.svc.ledger.has_identity(pid(PAYER))
                    and {rec.digest for rec in n.store.locks()} == set(stored)
                ),
                witnesses,
            )

            # Witness 3 is from before batches: it answers certify_many "unknown op", and
            # the payer asks it one transfer at a time instead.
            old = witnesses[3].svc.witness_server
            singles = 0
            all_asked = trio.Event()
            certify = old.certify

            async def unknown_op(request: object) -> object:
                raise ValidationError("unknown op 'certify_many', expected one of certify, ...")

            async def counted(request: Certify) -> CertifyReply:
                nonlocal singles
                singles += 1
                if singles == 20:
                    all_asked.set()
                return await certify(request)

            old.certify_many = unknown_op  # type: ignore[method-assign,assignment]
            old.certify = counted  # type: ignore[method-assign]
            owed = [make_receipt(PAYER, PAYEE, 10, 100 + j) for j in range(20)]
            commits = [w.store.commits for w in witnesses]
            outcomes = await payer.svc.payer.pay_all(owed)
            assert [getattr(o, "seq", o) for o in outcomes] == list(range(4, 24))
            # One at a time this took a lock fsync per payment on every witness; batched,
            # a lock commit and a certificate commit or two per witness.
            for w, before in zip(witnesses[:3], commits, strict=False):
                assert w.store.commits - before < 10, w.store.commits - before
            with trio.fail_after(20):
                await all_asked.wait()  # the old witness was asked all 20, one by one


async def test_garbage_on_the_wire_gets_an_error_and_the_service_keeps_serving(
    tmp_path: Path,
) -> None:
    async with AsyncExitStack() as stack:
        server, client = (await _world(stack, tmp_path, [], auto_pay=False))[:2]
        for bad in (
            frame(b"\xff\x00garbage", max_size=MAX_FRAME),
            frame(encode({"v": 2, "op": "push", "items": []}), max_size=MAX_FRAME),
            frame(encode({"v": 1, "op": "steal"}), max_size=MAX_FRAME),
            frame(encode({"v": 1, "op": "get", "ids": [b"short"]}), max_size=MAX_FRAME),
            frame(encode({"v": 1, "op": "certify", "req": b"\x00" * 10}), max_size=MAX_FRAME),
            encode_uvarint(MAX_FRAME + 1),  # an oversize announcement: refused before buffering
        ):
            stream = await client.peer.host.new_stream(ID.from_base58(server.id), [PROTOCOL_ID])
            try:
                await stream.write(bad)
                decoder = FrameDecoder(max_size=MAX_FRAME)
                with trio.fail_after(5):
                    while (reply := decoder.next_frame()) is None:
                        chunk = await stream.read(65536)
                        assert chunk, "closed without an error reply"
                        decoder.feed(chunk)
                body = decode(reply, max_size=MAX_FRAME)
                assert set(body) == {"v", "err"} and body["err"], body
            finally:
                await stream.close()
        # Still serving: a real request on a new stream works.
        assert await client.svc.push(server.id, []) == 0
        r = make_receipt(PAYER, PAYEE, 5, 9)
        assert await client.svc.push(server.id, [(FactKind.RECEIPT, r.to_bytes())]) == 1
