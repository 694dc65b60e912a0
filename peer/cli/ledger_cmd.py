"""`edgeswarm ledger balances|receipts|verify|state-hash|status`: read this peer's ledger.

Every command opens the ledger database read-only (a WAL reader), so it works
while the peer is running and never blocks or changes it. Amounts are integer
micro-credits in ``--json`` output and credits with 6 decimals for people.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from peer.cli import app
from peer.cli.common import DataDirOpt, JsonOpt, config_from_cli, fail, print_json
from peer.ledger_store import (
    LedgerSnapshot,
    StoreError,
    db_path,
    format_credits,
    read_snapshot,
    verify_snapshot,
)
from peer.settlement.epochs import with_epoch_rules
from peer.settlement_paths import NetworkError, ledger_dir
from protocols.committee import describe_committee
from protocols.epochs import EpochRules
from protocols.errors import ProtocolError
from protocols.ledger_state import LedgerState

if TYPE_CHECKING:
    from peer.cli.local_api import LocalApi

ledger_app = typer.Typer(
    name="ledger",
    help="Read this peer's settlement ledger (balances, receipts, checks); safe while it runs.",
    no_args_is_help=True,
)
app.add_typer(ledger_app, name="ledger")


NetworkOpt = Annotated[
    str | None,
    typer.Option(
        "--network",
        metavar="ID",
        help="Which network's ledger (a network id or a prefix of 8+ hex digits; "
        "default: the one this data dir used last).",
        show_default=False,
    ),
]


def _snapshot(data_dir: Any, network: str | None = None) -> LedgerSnapshot:
    cfg = config_from_cli(data_dir=data_dir)
    try:
        where = ledger_dir(cfg.data_dir, network)
        snap = read_snapshot(db_path(where))
        return with_epoch_rules(snap, where)
    except (StoreError, NetworkError) as exc:
        fail(str(exc))


def _running(data_dir: Any, network: str | None = None) -> LocalApi | None:
    """The running peer of this data dir (its ledger is live in memory there), or None
    (also when another network's ledger is asked for)."""
    from peer.cli.local_api import running_peer

    if network:
        return None
    return running_peer(config_from_cli(data_dir=data_dir))


def _live_ledger(api: LocalApi) -> dict[str, Any]:
    answer: dict[str, Any] = api.get_json("/api/ledger")
    if not answer.get("available"):
        fail(f"the running peer has no ledger: {answer.get('reason', 'settlement is off')}")
    return answer


@ledger_app.command("balances")
def balances(
    data_dir: DataDirOpt = None, json_out: JsonOpt = False, network: NetworkOpt = None
) -> None:
    """Every account's balance (mutual credit: they sum to zero)."""
    api = _running(data_dir, network)
    values = _live_ledger(api)["balances"] if api else _snapshot(data_dir, network).balances
    if json_out:
        print_json(dict(sorted(values.items())))
        return
    if not values:
        typer.echo("no balances yet (no certified payments in this ledger)")
        return
    for account, micro in sorted(values.items(), key=lambda kv: (kv[1], kv[0])):
        typer.echo(f"{account}  {format_credits(micro):>18}")
    typer.echo(f"{len(values)} accounts, sum {format_credits(sum(values.values()))}")


@ledger_app.command("receipts")
def receipts(
    data_dir: DataDirOpt = None, json_out: JsonOpt = False, network: NetworkOpt = None
) -> None:
    """Receipts held in the ledger and whether a certificate pays them."""
    from peer.http.explorer import receipt_rows

    api = _running(data_dir, network)
    if api is not None:
        answer = api.get_json("/api/ledger/receipts")
        rows, bad = answer["receipts"], answer["bad"]
    else:
        snap = _snapshot(data_dir, network)
        rows, bad = receipt_rows((kind, data) for _fid, kind, data in snap.facts)
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
def verify(
    data_dir: DataDirOpt = None, json_out: JsonOpt = False, network: NetworkOpt = None
) -> None:
    """Re-check every signature, certificate quorum, lock and the balance fold.

    Exits 1 if anything is wrong."""
    snap = _snapshot(data_dir, network)
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
def state_hash(
    data_dir: DataDirOpt = None, json_out: JsonOpt = False, network: NetworkOpt = None
) -> None:
    """The ledger's state hash: equal on every peer that holds the same facts."""
    api = _running(data_dir, network)
    if api is not None:
        value = _live_ledger(api)["state_hash"]
        if json_out:
            print_json({"state_hash": value})
        else:
            typer.echo(value)
        return
    snap = _snapshot(data_dir, network)
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


@ledger_app.command("status")
def status(
    data_dir: DataDirOpt = None, json_out: JsonOpt = False, network: NetworkOpt = None
) -> None:
    """The network this ledger belongs to and this identity's witness committee.

    A committee smaller than 3f+1 (f = 0 with one witness) is degraded: one
    operator then certifies every payment; it is shown here and logged as a warning."""
    import time as _time

    from peer.identity import load_or_create_identity, peer_id_of
    from peer.settlement_paths import GENESIS_FILE, read_genesis_file

    cfg = config_from_cli(data_dir=data_dir)
    try:
        where = ledger_dir(cfg.data_dir, network)
    except NetworkError as exc:
        fail(str(exc))
    snap = _snapshot(data_dir, network)
    report = verify_snapshot(snap)
    ledger = report.ledger
    genesis = None
    if (where / GENESIS_FILE).exists():
        try:
            genesis = read_genesis_file(where / GENESIS_FILE)
        except NetworkError as exc:
            fail(str(exc))
    account = peer_id_of(load_or_create_identity(cfg.key_path)) if cfg.key_path.exists() else None
    out: dict[str, Any] = {
        "network_id": genesis.network_id if genesis else None,
        "network_name": genesis.name if genesis else None,
        "genesis": genesis.describe() if genesis else None,
        "ledger": str(snap.path),
        "facts": report.facts,
        "ok": report.ok,
        "state_hash": ledger.state_hash().hex() if ledger is not None else None,
        "account": account,
        "committee": None,
        "eligible_pool": None,
        "epochs": None,
    }
    rule = ledger.rule if ledger is not None else None
    if isinstance(rule, EpochRules):
        rule.tick(int(_time.time() * 1000))
        out["epochs"] = rule.describe()
    if ledger is not None and account is not None:
        try:
            committee = ledger.rule.committee_for(account)
            current = rule.current_rule if isinstance(rule, EpochRules) else ledger.rule
            out["committee"] = describe_committee(committee, current)
        except ProtocolError as exc:  # this account is the only witness there is
            out["committee"] = {"members": [], "size": 0, "degraded": True, "error": str(exc)}
    if ledger is not None and genesis is not None:
        pool = ledger.eligible_pool(int(_time.time() * 1000), genesis.eligible_earned)
        out["eligible_pool"] = {
            "members": sorted(pool),
            "size": len(pool),
            "needed": 3 * genesis.f + 1,
            "used_for_committees": isinstance(rule, EpochRules),
        }
    if json_out:
        print_json(out)
        return
    typer.echo(f"network   {out['network_id'] or '?'} ({out['network_name'] or '?'})")
    typer.echo(f"ledger    {out['ledger']} ({out['facts']} facts)")
    typer.echo(f"account   {account or '-'}")
    c = out["committee"]
    if c is not None and "error" in c:
        typer.echo(f"committee DEGRADED: {c['error']}")
    elif c is not None:
        state = "DEGRADED" if c["degraded"] else "ok"
        typer.echo(
            f"committee {c['size']} of {c['target_size']} witnesses, f = {c['f']}, "
            f"quorum {c['quorum']} ({state}): {', '.join(m[-8:] for m in c['members'])}"
        )
    p = out["eligible_pool"]
    if p is not None:
        typer.echo(f"eligible pool {p['size']} (needs {p['needed']} to replace the fallback)")
