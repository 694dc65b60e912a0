"""Read-only views: ``GET /explorer`` (one HTML page, no build step), its JSON, ``GET /metrics``.

The page fetches ``/api/node``, ``/api/peers``, ``/api/models``, ``/api/jobs``,
``/api/ledger`` and ``/api/fraud`` and re-renders them every few seconds. Every
value is inserted as text (``textContent``), never as HTML, since ads and
ledger facts come from other peers. Nothing here changes state, so nothing
here needs the token.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from peer import metrics
from peer.http.app import VERSION, front

log = logging.getLogger(__name__)

RECENT = 100  # jobs, certificates and proofs shown


def _default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def json_response(value: Any, status: int = 200) -> Response:
    body = json.dumps(value, default=_default, separators=(",", ":"))
    return Response(body, status_code=status, media_type="application/json")


async def api_node(request: Request) -> Response:
    peer = front(request).peer
    ad = peer.ad
    return json_response(
        {
            "peer_id": peer.peer_id,
            "role": peer.role,
            "version": VERSION,
            "listen_addrs": list(peer.listen_addrs),
            "connected_peers": peer.connected_peers(),
            "ad": ad.to_dict() if ad is not None else None,
            "market": getattr(peer, "market", None) is not None,
            "settlement": getattr(peer, "settlement", None) is not None,
        }
    )


async def api_peers(request: Request) -> Response:
    ads = await front(request).ads()
    return json_response([ad.to_dict() for ad in ads])


async def api_models(request: Request) -> Response:
    door = front(request)
    network: dict[str, dict[str, Any]] = {}
    for ad in await door.ads():
        for m in ad.models:
            row = network.setdefault(
                m.cid, {"cid": m.cid, "names": [], "servers": [], "min_price": ad.price}
            )
            if m.name and m.name not in row["names"]:
                row["names"].append(m.name)
            row["servers"].append({"peer_id": ad.peer_id, "price": ad.price, "p50_ms": m.p50_ms})
            row["min_price"] = min(row["min_price"], ad.price)
    local = [e.to_dict() for e in door.registry.list()] if door.registry is not None else []
    return json_response(
        {"network": sorted(network.values(), key=lambda r: r["cid"]), "local": local}
    )


def _paid(peer: Any, receipt: Any) -> bool | None:
    svc = getattr(peer, "settlement", None)
    if svc is None:
        return None
    try:
        return bool(svc.ledger.is_paid(receipt))
    except Exception:
        return None


async def api_jobs(request: Request) -> Response:
    peer = front(request).peer
    market = getattr(peer, "market", None)
    rows = []
    receipts = list(market.receipts.receipts)[-RECENT:] if market is not None else []
    for r in reversed(receipts):
        try:
            r.verify()
            verified: Any = True
        except Exception as exc:
            verified = f"invalid: {exc}"
        rows.append(
            {
                "receipt_id": r.receipt_id.hex(),
                "job_id": r.job_id.hex(),
                "model_cid": r.model_cid,
                "requester": r.requester,
                "executor": r.executor,
                "price": r.price,
                "count": r.count,
                "verified": verified,
                "paid": _paid(peer, r),
                "role": "requester" if r.requester == peer.peer_id else "executor",
            }
        )
    total = market.receipts.count if market is not None else 0
    return json_response({"receipts": rows, "total": total})


def _facts(svc: Any, kind: Any) -> list[bytes]:
    ledger = svc.ledger
    out = []
    for fid in ledger.fact_ids():
        item = ledger.item(fid)
        if item is not None and item[0] == kind:
            out.append(item[1])
    return out[-RECENT:]


async def api_ledger(request: Request) -> Response:
    from protocols.certificate import Certificate
    from protocols.ledger_state import FactKind

    peer = front(request).peer
    svc = getattr(peer, "settlement", None)
    if svc is None:
        return json_response({"available": False, "reason": "this node runs no settlement"})
    ledger = svc.ledger
    certificates = []
    for data in _facts(svc, FactKind.CERTIFICATE):
        try:
            t = Certificate.from_bytes(data).transfer.message
            certificates.append(
                {
                    "payer": t.payer,
                    "payee": t.payee,
                    "amount": t.amount,
                    "seq": t.seq,
                    "receipt_id": t.receipt_id.hex(),
                    "time_ms": t.time_ms,
                }
            )
        except Exception as exc:
            certificates.append({"error": f"does not parse: {exc}"})
    return json_response(
        {
            "available": True,
            "account": peer.peer_id,
            "balances": dict(sorted(svc.balances().items())),
            "state_hash": svc.state_hash().hex(),
            "facts": len(ledger),
            "certificates": certificates[::-1],
            "unpaid": [r.receipt_id.hex() for r in svc.unpaid()],
        }
    )


def receipt_rows(facts: Iterable[tuple[int, bytes]]) -> tuple[list[dict[str, Any]], int]:
    """Receipts among ledger facts ``(kind, bytes)``, each with whether a certificate pays it;
    and how many facts did not parse (``edgeswarm ledger verify`` has the details)."""
    from peer.ledger_store import parse_fact
    from protocols.certificate import Certificate
    from protocols.errors import ProtocolError
    from protocols.ledger_state import FactKind

    paid: set[bytes] = set()
    rows: list[dict[str, Any]] = []
    bad = 0
    for kind, data in facts:
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
            bad += 1
    for row in rows:
        row["paid"] = bytes.fromhex(row["receipt_id"]) in paid
    return rows, bad


async def api_ledger_receipts(request: Request) -> Response:
    svc = getattr(front(request).peer, "settlement", None)
    if svc is None:
        return json_response({"available": False, "receipts": [], "bad": 0})
    ledger = svc.ledger
    items = (ledger.item(fid) for fid in ledger.fact_ids())
    rows, bad = receipt_rows(item for item in items if item is not None)
    return json_response({"available": True, "receipts": rows, "bad": bad})


async def api_fraud(request: Request) -> Response:
    from protocols.ledger_state import FactKind
    from protocols.proofs import FraudProof

    svc = getattr(front(request).peer, "settlement", None)
    if svc is None:
        return json_response({"available": False, "proofs": []})
    proofs = []
    for data in _facts(svc, FactKind.FRAUD_PROOF):
        try:
            p = FraudProof.from_bytes(data)
            c = p.commitment.message
            proofs.append(
                {
                    "offender": p.offender,
                    "job_id": c.job_id.hex(),
                    "model_cid": c.model_cid,
                    "referees": len(p.results),
                    "time_ms": p.time_ms,
                }
            )
        except Exception as exc:
            proofs.append({"error": f"does not parse: {exc}"})
    return json_response({"available": True, "proofs": proofs[::-1]})


class _Scrape:
    """Our process-wide metrics plus gauges read from this peer."""

    def __init__(self, peer: Any) -> None:
        self.peer_collector = metrics.PeerCollector(peer)

    def collect(self) -> Any:
        yield from metrics.REGISTRY.collect()
        yield from self.peer_collector.collect()


def metrics_app(peer: Any) -> Any:
    scrape = _Scrape(peer)

    async def endpoint(request: Request) -> Response:
        return Response(generate_latest(scrape), media_type=CONTENT_TYPE_LATEST)

    return endpoint


async def explorer(request: Request) -> Response:
    return HTMLResponse(PAGE)


def routes() -> list[tuple[str, list[str], Any]]:
    return [
        ("/explorer", ["GET"], explorer),
        ("/api/node", ["GET"], api_node),
        ("/api/peers", ["GET"], api_peers),
        ("/api/models", ["GET"], api_models),
        ("/api/jobs", ["GET"], api_jobs),
        ("/api/ledger", ["GET"], api_ledger),
        ("/api/ledger/receipts", ["GET"], api_ledger_receipts),
        ("/api/fraud", ["GET"], api_fraud),
    ]


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>edgeswarm explorer</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
h2 { font-size: 1.1em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 0.2em 0.6em; border-bottom: 1px solid #eee;
         vertical-align: top; }
td { font-family: ui-monospace, monospace; font-size: 12px; word-break: break-all; }
.muted { color: #888; }
.bad { color: #b00; }
.ok { color: #070; }
</style>
</head>
<body>
<h1>edgeswarm explorer</h1>
<div id="node" class="muted">loading...</div>
<div id="status" class="muted"></div>
<h2>Peers and their ads</h2>
<table id="peers"></table>
<h2>Models in the network</h2>
<table id="models"></table>
<h2>Recent jobs and receipts</h2>
<table id="jobs"></table>
<h2>Ledger: balances, certificates, state hash</h2>
<div id="ledger-summary"></div>
<table id="balances"></table>
<table id="certificates"></table>
<h2>Fraud proofs</h2>
<table id="fraud"></table>
<script>
"use strict";
// ?refresh=MS changes how often the page reloads its data (0.5 s .. 60 s; default 5 s).
const asked = Number(new URLSearchParams(location.search).get("refresh"));
const REFRESH_MS = asked >= 500 && asked <= 60000 ? asked : 5000;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function table(id, headers, rows) {
  const t = document.getElementById(id);
  t.replaceChildren();
  const head = el("tr");
  for (const h of headers) head.appendChild(el("th", h));
  t.appendChild(head);
  if (rows.length === 0) {
    const tr = el("tr");
    const td = el("td", "none", "muted");
    td.colSpan = headers.length;
    tr.appendChild(td);
    t.appendChild(tr);
  }
  for (const row of rows) {
    const tr = el("tr");
    for (const cell of row) {
      if (cell instanceof Node) { const td = el("td"); td.appendChild(cell); tr.appendChild(td); }
      else tr.appendChild(el("td", cell));
    }
    t.appendChild(tr);
  }
}

async function get(path) {
  const r = await fetch(path, {cache: "no-store"});
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

function credits(micro) { return (micro / 1e6).toFixed(6); }

async function refresh() {
  const status = document.getElementById("status");
  try {
    const [node, peers, models, jobs, ledger, fraud] = await Promise.all(
      ["/api/node", "/api/peers", "/api/models", "/api/jobs", "/api/ledger", "/api/fraud"]
        .map(get));
    const n = document.getElementById("node");
    n.replaceChildren(el("span", "this " + node.role + ": "), el("code", node.peer_id));
    n.id = "node";
    n.className = "";
    n.dataset.peerId = node.peer_id;
    table("peers", ["peer id", "reachability", "addrs", "devices", "providers", "models", "price",
                    "load"],
      peers.map(ad => [
        ad.peer_id,
        ad.reachability || "unknown",
        (ad.addrs || []).join("\\n"),
        (ad.devices || []).map(d => d.kind + ": " + d.name).join("\\n"),
        (ad.providers || []).join("\\n"),
        (ad.models || []).map(m => (m.name || "?") + " " + m.cid).join("\\n"),
        ad.price,
        ad.load + " (queue " + ad.queue + ")",
      ]));
    table("models", ["cid", "names", "servers", "lowest price"],
      models.network.map(m => [m.cid, m.names.join(", "), m.servers.length, m.min_price])
        .concat(models.local
          .filter(l => !models.network.some(m => m.cid === l.cid))
          .map(l => [l.cid, l.name, "local only", "-"])));
    table("jobs", ["receipt", "model", "requester", "executor", "price", "jobs", "signatures",
                   "paid"],
      jobs.receipts.map(r => [
        r.receipt_id.slice(0, 16), r.model_cid.slice(0, 16), r.requester, r.executor,
        credits(r.price), r.count,
        el("span", r.verified === true ? "valid" : r.verified, r.verified === true ? "ok" : "bad"),
        r.paid === null ? "-" : (r.paid ? "paid" : "unpaid"),
      ]));
    const summary = document.getElementById("ledger-summary");
    if (ledger.available) {
      summary.replaceChildren(el("span", "state hash "), el("code", ledger.state_hash),
        el("span", "  " + ledger.facts + " facts, " + ledger.unpaid.length + " unpaid"));
      table("balances", ["account", "balance (credits)"],
        Object.entries(ledger.balances).map(([a, b]) => [a, credits(b)]));
      table("certificates", ["payer", "payee", "amount", "seq", "receipt"],
        ledger.certificates.map(c => [c.payer, c.payee, credits(c.amount), c.seq,
                                      (c.receipt_id || "").slice(0, 16)]));
    } else {
      summary.replaceChildren(el("span", "no ledger on this node", "muted"));
    }
    table("fraud", ["offender", "job", "model", "referees"],
      fraud.proofs.map(p => [p.offender, (p.job_id || "").slice(0, 16),
                             (p.model_cid || "").slice(0, 16), p.referees]));
    status.textContent = "updated " + new Date().toLocaleTimeString();
    status.className = "muted";
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
  } catch (e) {
    status.textContent = "refresh failed: " + e.message;
    status.className = "bad";
  }
}

// One refresh at a time: the next starts REFRESH_MS after the last one ended.
async function loop() {
  await refresh();
  setTimeout(loop, REFRESH_MS);
}
loop();
</script>
</body>
</html>
"""
