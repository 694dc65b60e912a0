"""`edgeswarm ledger balances|receipts|verify|state-hash`: read this peer's settlement ledger.

Every command opens the ledger database read-only (a WAL reader), so it works
while the peer is running and never blocks or changes it. Amounts are integer
micro-credits in ``--json`` output and credits with 6 decimals for people.
"""

from __future__ import annotations

from typing import Any

import typer

from peer.cli import app
from peer.cli.common import DataDirOpt, JsonOpt, config_from_cli, fail, print_json
from peer.ledger_store import (
    LedgerSnapshot,
    StoreError,
    db_path,
    format_credits,
    parse_fact,
    read_snapshot,
    verify_snapshot,
)
from protocols.certificate import Certificate
from protocols.errors import ProtocolError
from protocols.ledger_state import FactKind, LedgerState

ledger_app = typer.Typer(
    name="ledger",
    help="Read this peer's settlement ledger (balances, receipts, checks); safe while it runs.",
    no_args_is_help=True,
)
app.add_typer(ledger_app, name="ledger")


def _snapshot(data_dir: Any) -> LedgerSnapshot:
    cfg = config_from_cli(data_dir=data_dir)
    try:
        return read_snapshot(db_path(cfg.data_dir))
    except StoreError as exc:
        fail(str(exc))


@ledger_app.command("balances")
def balances(data_dir: DataDirOpt = None, json_out: JsonOpt = False) -> None:
    """Every account's balance (mutual credit: they sum to zero)."""
    snap = _snapshot(data_dir)
    if json_out:
        print_json(dict(sorted(snap.balances.items())))
        return
    if not snap.balances:
        typer.echo("no balances yet (no certified payments in this ledger)")
        return
    for account, micro in sorted(snap.balances.items(), key=lambda kv: (kv[1], kv[0])):
        typer.echo(f"{account}  {format_credits(micro):>18}")
    typer.echo(f"{len(snap.balances)} accounts, sum {format_credits(sum(snap.balances.values()))}")


@ledger_app.command("receipts")
def receipts(data_dir: DataDirOpt = None, json_out: JsonOpt = False) -> None:
    """Receipts held in the ledger and whether a certificate pays them."""
    snap = _snapshot(data_dir)
    paid: set[bytes] = set()
    rows: list[dict[str, Any]] = []
    bad = 0
    for _fid, kind, data in snap.facts:
        try:
            if kind == FactKind.CERTIFICATE:
                paid.add(Certificate.from_bytes(data).transfer.message.receipt_id)
            elif kind in (FactKind.RECEIPT, FactKind.ARBITRATED_RECEIPT):
                r, rid = parse_fact(FactKind(kind), data)
                rows.append(
                    {
                        "receipt_id": rid.hex(),
                        "job_id": r.job_id.hex(),
                        "requester": r.requester,
                        "executor": r.executor,
                        "price": r.price,
                        "arbitrated": kind == FactKind.ARBITRATED_RECEIPT,
                    }
                )
        except (ProtocolError, ValueError):
            bad += 1  # `edgeswarm ledger verify` reports the details
    for row in rows:
        row["paid"] = bytes.fromhex(row["receipt_id"]) in paid
    if json_out:
        print_json(rows)
        return
    if not rows:
        typer.echo("no receipts")
    for row in rows:
        state = "paid" if row["paid"] else "unpaid"
        typer.echo(
            f"{row['receipt_id'][:16]}  {row['requester'][-8:]} -> {row['executor'][-8:]}  "
            f"{format_credits(row['price']):>14}  {state}"
        )
    if bad:
        typer.echo(f"{bad} stored fact(s) do not parse: run `edgeswarm ledger verify`", err=True)


@ledger_app.command("verify")
def verify(data_dir: DataDirOpt = None, json_out: JsonOpt = False) -> None:
    """Re-check every signature, certificate quorum, lock and the balance fold.

    Exits 1 if anything is wrong."""
    snap = _snapshot(data_dir)
    report = verify_snapshot(snap)
    state_hash = report.ledger.state_hash().hex() if report.ledger is not None else None
    if json_out:
        print_json(
            {
                "ok": report.ok,
                "facts": report.facts,
                "locks": report.locks,
                "outgoing": report.outgoing,
                "schema_version": snap.schema_version,
                "state_hash": state_hash,
                "problems": report.problems,
            }
        )
    else:
        for problem in report.problems:
            typer.echo(f"problem: {problem}")
        verdict = "ok" if report.ok else f"{len(report.problems)} problem(s)"
        typer.echo(
            f"{snap.path}: {report.facts} facts, {report.locks} witness locks, "
            f"{report.outgoing} pending transfers: {verdict}"
        )
    if not report.ok:
        raise typer.Exit(1)


@ledger_app.command("state-hash")
def state_hash(data_dir: DataDirOpt = None, json_out: JsonOpt = False) -> None:
    """The ledger's state hash: equal on every peer that holds the same facts."""
    snap = _snapshot(data_dir)
    if snap.state_hash is not None:
        value = snap.state_hash.hex()
    elif snap.rule is not None and snap.policy is not None:
        value = LedgerState(snap.rule, snap.policy).state_hash().hex()  # empty ledger
    else:
        fail(f"{snap.path} has no committee rule; run `edgeswarm ledger verify`")
    if json_out:
        print_json({"state_hash": value})
    else:
        typer.echo(value)
