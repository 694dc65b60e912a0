"""A checkpoint is adopted in a copy of the ledger built in a worker thread
(``LedgerStore._adopt_off_loop``): the live ledger keeps serving meanwhile, and what it
learns in that window is kept when the copy takes its place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from settlement_helpers import pid
from test_ledger_checkpoint import PAYERS, POLICY, RULE, T0, certified, signed

from peer.ledger_store import open_ledger_store, read_snapshot, verify_snapshot
from protocols.checkpoint import rule_id
from protocols.ledger_state import FactKind, LedgerState, NeedAccounts

P = PAYERS[0]


def _items(first: int, last: int) -> list[tuple[FactKind, bytes]]:
    out = []
    for seq in range(first, last + 1):
        r, c = certified(P, seq, seq, T0 + seq)
        out += [(FactKind.CERTIFICATE, c.to_bytes()), (FactKind.RECEIPT, r.to_bytes())]
    return out


async def test_facts_learned_while_the_copy_adopts_are_kept(tmp_path: Path) -> None:
    # The checkpoint covers seqs 1..6 (drafted by a ledger that holds 6); this one holds 1..5.
    other = LedgerState(RULE, POLICY)
    for kind, data in _items(1, 6):
        other.ingest_bytes(kind, data)
    header, accounts = other.checkpoint_draft(T0 + 100, rule_id(RULE))
    cp = signed(header)
    seven = _items(7, 7)  # after the cut
    six = _items(6, 6)[:1]  # covered, arriving late
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        assert all(x is True for x in await store.add_facts(_items(1, 5)))
        in_window: list[Any] = []

        async def meanwhile(fn: Any, *args: Any) -> Any:
            # The event loop still serves the live ledger: a payer's and a witness's
            # nowait writes land while the copy is built (here, just before the thread).
            assert store.ledger.checkpoint is None  # the live ledger is untouched so far
            in_window.extend(store.add_facts_nowait(seven + six))
            return await trio.to_thread.run_sync(fn, *args)

        store._to_thread = meanwhile
        adoption = await store.adopt_checkpoint(cp, accounts)
        assert in_window == [True, True, True]
        assert len(adoption.pruned) == 10  # seqs 1..5 and their receipts
        assert store.ledger.checkpoint == cp
        assert store.ledger.next_seq(pid(P)) == 8  # 1..6 covered, 7 learned in the window
        for kind, data in seven:
            assert store.ledger.ingest_bytes(kind, data) is False  # held
        state, balances = store.ledger.state_hash(), store.ledger.balances()
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        # The covered certificate that came late is known, and got no row.
        assert store.fact_count() == 3  # the checkpoint, seq 7's certificate and receipt
        assert store.ledger.state_hash() == state
        assert store.ledger.balances() == balances
    report = verify_snapshot(read_snapshot(tmp_path))
    assert report.ok, report.problems


async def test_a_checkpoint_the_copy_refuses_leaves_the_live_ledger_as_it_was(
    tmp_path: Path,
) -> None:
    other = LedgerState(RULE, POLICY)
    for kind, data in _items(1, 3):
        other.ingest_bytes(kind, data)
    header, _ = other.checkpoint_draft(T0 + 100, rule_id(RULE))
    async with open_ledger_store(tmp_path, RULE, POLICY) as store:
        await store.add_facts(_items(1, 2))
        before = store.ledger.state_hash()
        with pytest.raises(NeedAccounts):  # its facts do not give the header
            await store.adopt_checkpoint(signed(header))
        assert store.ledger.state_hash() == before
        assert store.ledger.checkpoint is None and store.ledger.journal is None
        # The store keeps working.
        assert await store.add_facts(_items(3, 3)) == [True, True]
