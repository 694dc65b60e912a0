"""The control token: ``<data dir>/http.token`` (mode 0600), and the bearer check.

The token is created (32 random bytes, URL-safe) the first time the HTTP server
starts, and kept across restarts. Anyone who can read the file may spend this
peer's credits and change its state, exactly like anyone who can read its key.
It is compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

TOKEN_FILE = "http.token"
MAX_TOKEN_BYTES = 256

Endpoint = Callable[[Request], Awaitable[Response]]


class TokenError(Exception):
    """The token file cannot be created or read safely."""


def token_path(data_dir: Path) -> Path:
    return Path(data_dir) / TOKEN_FILE


def load_or_create_token(data_dir: Path) -> str:
    """Read the token, or create it (0600, atomically: two starters end with one token)."""
    path = token_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_token(path)
    try:
        token = secrets.token_urlsafe(32)
        os.write(fd, token.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return token


def read_token(path: Path) -> str:
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise TokenError(f"{path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
        with path.open("rb") as f:
            raw = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise TokenError(f"cannot read the control token {path}: {exc.strerror or exc}") from exc
    token = raw.decode("ascii", "replace").strip()
    if not token or len(raw) > MAX_TOKEN_BYTES:
        raise TokenError(f"{path} does not hold a token; delete it to make a new one")
    return token


def bearer_ok(header: str | None, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


def unauthorized(message: str) -> Response:
    return JSONResponse(
        {"error": message},
        status_code=401,
        headers={"www-authenticate": 'Bearer realm="edgeswarm"'},
    )


def requires_token(endpoint: Endpoint) -> Endpoint:
    """Wrap a route that spends credits or changes state: 401 unless the bearer token matches.

    The wrapper is marked (``requires_token = True``) so a test can walk the
    route table and find any state-changing route that forgot it.
    """

    async def guarded(request: Request) -> Response:
        token: str = request.app.state.token
        if not bearer_ok(request.headers.get("authorization"), token):
            return unauthorized(
                "this route needs Authorization: Bearer <token> (the token is in the peer's "
                f"data dir, {TOKEN_FILE})"
            )
        return await endpoint(request)

    marked: Any = guarded
    marked.requires_token = True
    marked.__name__ = endpoint.__name__
    marked.__doc__ = endpoint.__doc__
    return guarded
