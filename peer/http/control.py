"""The local control API: ``edgeswarm models add|remove|fetch`` etc. against a running peer.

Every route here changes state or spends credits, so every one needs the
bearer token (``requires_token``). Paths given to ``models add`` are read by
the peer process, which runs as the same user as whoever holds the token.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import trio
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from peer.http.app import HttpError, front, read_json
from peer.http.auth import requires_token

log = logging.getLogger(__name__)

MAX_PAY_WAIT_S = 120.0
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _registry(request: Request) -> Any:
    registry = front(request).registry
    if registry is None:
        raise HttpError(503, "this peer has no model store (it runs no model runtime)")
    return registry


def _str(body: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > 4096:
        raise HttpError(400, f"{key} must be a non-empty string")
    return value


async def models_add(request: Request) -> Response:
    """Add a model from a file the peer can read, or a packaged one; then serve it."""
    from edge_models.errors import EdgeModelError

    body = await read_json(request)
    path, pkg, name = _str(body, "path"), _str(body, "packaged"), _str(body, "name")
    if (path is None) == (pkg is None):
        raise HttpError(400, "give exactly one of path or packaged")
    registry = _registry(request)
    try:
        if pkg is not None:
            entry = await trio.to_thread.run_sync(lambda: registry.add_packaged(pkg, as_name=name))
        else:
            entry = await trio.to_thread.run_sync(lambda: registry.add_file(path, name))
    except EdgeModelError as exc:
        raise HttpError(400, str(exc)) from None
    except OSError as exc:
        raise HttpError(400, f"cannot read {path}: {exc.strerror or exc}") from None
    served = await _serve(request, entry.cid)
    return JSONResponse({**entry.to_dict(), "served": served})


async def _serve(request: Request, cid: str) -> bool:
    market = getattr(front(request).peer, "market", None)
    if market is None or getattr(market, "runtime", None) is None:
        return False
    return cid in await market.serve([cid])


async def models_remove(request: Request) -> Response:
    """Stop serving a model and delete it from the store."""
    from edge_models.errors import EdgeModelError

    registry = _registry(request)
    try:
        entry = await trio.to_thread.run_sync(registry.remove, request.path_params["model"])
    except EdgeModelError as exc:
        raise HttpError(404, str(exc)) from None
    peer = front(request).peer
    market = getattr(peer, "market", None)
    # Stop bidding on it (the market has no public "unserve" yet).
    if market is not None:
        getattr(market, "served", {}).pop(entry.cid, None)
        executor = getattr(market, "executor", None)
        getattr(executor, "offers", {}).pop(entry.cid, None)
        peer.models_changed()
    return JSONResponse({"removed": entry.to_dict()})


async def models_fetch(request: Request) -> Response:
    """Fetch a model by cid from the peers that provide it (``peer.fetch_model``), and serve it."""
    body = await read_json(request)
    cid = _str(body, "cid", required=True)
    if cid is None or not _HEX64.fullmatch(cid):
        raise HttpError(400, "cid must be a model's sha256 (64 lowercase hex digits)")
    from peer.model_transfer import ModelRejected, NoProviders, TransferFailed

    peer = front(request).peer
    name = _str(body, "name")
    try:
        entry = await peer.fetch_model(cid, name=name)
    except NoProviders as exc:
        raise HttpError(404, str(exc)) from None
    except ModelRejected as exc:
        raise HttpError(400, str(exc)) from None
    except TransferFailed as exc:
        raise HttpError(502, str(exc)) from None
    except RuntimeError as exc:  # a bootstrap node fetches no models
        raise HttpError(503, str(exc)) from None
    market = getattr(peer, "market", None)
    served = market is not None and cid in getattr(market, "served", {})
    return JSONResponse({**entry.to_dict(), "served": served})


async def payment_status(peer: Any, receipt: Any, wait: float) -> str:
    """Wait (bounded) until the background payer has paid ``receipt``; say how it ended.

    A payment that is not certified in time stays stored in the ledger; the payer
    keeps at it while this identity runs (and resumes when it runs again).
    """
    svc = peer.settlement
    if svc is None:
        return "left to the peer that owns this data dir's ledger (it pays after syncing)"
    ledger, me = svc.ledger, peer.peer_id
    now_ms = int(time.time() * 1000)
    headroom = ledger.spendable(me, now_ms) + ledger.credit_limit(me, now_ms)
    if headroom < receipt.price and not ledger.is_paid(receipt):
        return (
            f"pending: {receipt.price / 1e6:g} credits is over what this identity may owe now "
            f"({headroom / 1e6:g} credits: its credit limit grows with what it earns); kept in "
            "the ledger, paid once it has earned enough"
        )
    with trio.move_on_after(wait):
        await svc.wait_until(lambda: svc.ledger.is_paid(receipt))
        return "certified by the witnesses"
    return (
        f"pending after {wait:.0f} s (kept in the ledger; resumes when this identity "
        "runs again; `edgeswarm ledger receipts` shows it)"
    )


async def pay(request: Request) -> Response:
    """Wait up to ``wait`` s for a receipt this peer owes to be paid (certified transfer)."""
    body = await read_json(request)
    rid = _str(body, "receipt_id", required=True)
    if rid is None or not _HEX64.fullmatch(rid):
        raise HttpError(400, "receipt_id must be 64 lowercase hex digits")
    wait = body.get("wait", 20.0)
    if isinstance(wait, bool) or not isinstance(wait, int | float):
        raise HttpError(400, "wait must be a number of seconds")
    if not 0 <= wait <= MAX_PAY_WAIT_S:
        raise HttpError(400, f"wait must be from 0 to {MAX_PAY_WAIT_S:g} seconds")
    peer = front(request).peer
    svc = peer.settlement
    if svc is None:
        raise HttpError(503, "this peer runs no settlement")
    rid_bytes = bytes.fromhex(rid)
    # A job's receipt reaches the ledger through a hook just after the job: give it a moment.
    with trio.move_on_after(min(float(wait), 5.0)):
        await svc.wait_until(lambda: svc.ledger.receipt(rid_bytes) is not None)
    receipt = svc.ledger.receipt(rid_bytes)
    if receipt is None:
        raise HttpError(404, f"no receipt {rid} in this peer's ledger")
    if receipt.requester != peer.peer_id:
        raise HttpError(400, f"receipt {rid} is owed by {receipt.requester}, not by this peer")
    status = await payment_status(peer, receipt, float(wait))
    paid = svc.ledger.is_paid(receipt)
    return JSONResponse({"receipt_id": rid, "paid": paid, "status": status})


async def shutdown(request: Request) -> Response:
    """Stop the peer (as SIGTERM would), after this answer is sent."""
    peer = front(request).peer
    event = getattr(peer, "stop_requested", None)
    if event is None:
        raise HttpError(501, "this peer cannot be stopped over HTTP (embedded in an app)")
    log.info("shutdown requested over the control API")

    async def stop() -> None:
        event.set()

    return JSONResponse({"stopping": True}, background=BackgroundTask(stop))


def routes() -> list[tuple[str, list[str], Any]]:
    return [
        ("/control/models", ["POST"], requires_token(models_add)),
        ("/control/models/fetch", ["POST"], requires_token(models_fetch)),
        ("/control/models/{model}", ["DELETE"], requires_token(models_remove)),
        ("/control/pay", ["POST"], requires_token(pay)),
        ("/control/shutdown", ["POST"], requires_token(shutdown)),
    ]
