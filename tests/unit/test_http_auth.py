"""Every state-changing or credit-spending route needs the bearer token; read-only ones are open.

The app is driven in-process through httpx's ASGI transport (no sockets).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import trio
from starlette.routing import Route

from peer.config import Config
from peer.http.app import FrontDoor, build_app
from peer.http.auth import TokenError, bearer_ok, load_or_create_token, read_token

TOKEN = "s3cret-token"
READ_ONLY = {"GET", "HEAD"}
# Routes that must stay open (read-only): health, metadata, metrics, explorer and its JSON.
OPEN_PREFIXES = ("/v2", "/metrics", "/explorer", "/api/")


def _peer(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(
        role="peer",
        peer_id="12D3KooWtest",
        market=None,
        settlement=None,
        ad=None,
        listen_addrs=[],
        config=Config(data_dir=tmp_path),
        connected_peers=lambda: [],
        stop_requested=trio.Event(),
        host=SimpleNamespace(get_connected_peers=lambda: []),
        discovery=SimpleNamespace(known_peer_ids=lambda: set()),
    )


def _routes(app: object) -> list[Route]:
    return [r for r in app.routes if isinstance(r, Route)]  # type: ignore[attr-defined]


def _concrete(path: str) -> str:
    return path.replace("{model}", "m").replace("{version}", "1")


def test_every_mutating_route_is_marked_as_needing_the_token(tmp_path: Path) -> None:
    app = build_app(FrontDoor(_peer(tmp_path), TOKEN))
    mutating = [r for r in _routes(app) if set(r.methods or ()) - READ_ONLY]
    assert mutating, "the route table has no state-changing routes?"
    unguarded = [r.path for r in mutating if not getattr(r.endpoint, "requires_token", False)]
    assert not unguarded, f"state-changing routes without the token check: {unguarded}"
    # And nothing read-only hides behind the token by mistake.
    for r in _routes(app):
        if not set(r.methods or ()) - READ_ONLY:
            assert r.path.startswith(OPEN_PREFIXES), r.path


async def test_mutating_routes_answer_401_without_the_right_token(tmp_path: Path) -> None:
    peer = _peer(tmp_path)
    app = build_app(FrontDoor(peer, TOKEN))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        checked = 0
        for route in _routes(app):
            for method in sorted(set(route.methods or ()) - READ_ONLY):
                url = _concrete(route.path)
                for headers in (
                    {},
                    {"Authorization": "Bearer wrong"},
                    {"Authorization": f"Bearer {TOKEN}x"},
                    {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": "Bearer "},
                ):
                    r = await client.request(method, url, headers=headers, content=b"{}")
                    assert r.status_code == 401, (method, url, headers, r.status_code)
                    assert "token" in r.json()["error"]
                    assert r.headers["www-authenticate"].startswith("Bearer")
                # With the token the handler runs (it may still refuse the empty body).
                r = await client.request(
                    method, url, headers={"Authorization": f"Bearer {TOKEN}"}, content=b"{}"
                )
                assert r.status_code != 401, (method, url)
                checked += 1
        assert checked >= 7
        # The shutdown route, with the token, asks the peer to stop (after answering).
        assert peer.stop_requested.is_set()


async def test_read_only_routes_are_open(tmp_path: Path) -> None:
    app = build_app(FrontDoor(_peer(tmp_path), TOKEN))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for path in (
            "/v2/health/live",
            "/v2/health/ready",
            "/v2",
            "/metrics",
            "/explorer",
            "/api/node",
            "/api/jobs",
            "/api/ledger",
            "/api/fraud",
        ):
            r = await client.get(path)
            # No token needed (ready is 503 here: this stub peer runs no market).
            assert r.status_code in (200, 503), (path, r.status_code, r.text)


def test_token_file_is_created_0600_once_and_reread(tmp_path: Path) -> None:
    token = load_or_create_token(tmp_path)
    path = tmp_path / "http.token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(token) >= 40
    assert load_or_create_token(tmp_path) == token
    os.chmod(path, 0o644)
    with pytest.raises(TokenError, match="chmod 600"):
        read_token(path)


def test_bearer_check() -> None:
    assert bearer_ok(f"Bearer {TOKEN}", TOKEN)
    assert bearer_ok(f"bearer {TOKEN}", TOKEN)
    for bad in (None, "", TOKEN, f"Bearer {TOKEN[:-1]}", f"Token {TOKEN}", "Bearer"):
        assert not bearer_ok(bad, TOKEN)
