"""The CLI's way to a running local peer: its HTTP control API instead of a second peer.

A peer started with ``--http`` writes ``<data dir>/http.json`` (its URL and
pid) and ``<data dir>/http.token``. ``running_peer(config)`` finds it when that
pid is alive and is the one holding the data dir's lock (``peer.lock``), and the
server at that URL answers with this data dir's peer id;
commands (``infer``, ``models add|remove|fetch``, ``ledger``) then go through
it, so one identity never runs as two peers. A peer that runs without
``--http`` is not found here: commands then do what they do with no peer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import httpx

from peer.cli.common import fail
from peer.config import Config

PROBE_TIMEOUT = 3.0
MAX_MARKER_BYTES = 4096


@dataclass
class LocalApi:
    url: str
    token: str
    peer_id: str

    def call(
        self,
        method: str,
        path: str,
        *,
        timeout: float = 60.0,
        expect: tuple[int, ...] = (200,),
        **kw: Any,
    ) -> httpx.Response:
        """One request with the token; an error answer or no answer ends the command (one line)."""
        headers = {"Authorization": f"Bearer {self.token}", **kw.pop("headers", {})}
        try:
            with httpx.Client(base_url=self.url, trust_env=False, timeout=timeout) as client:
                response = client.request(method, path, headers=headers, **kw)
        except httpx.HTTPError as exc:
            fail(f"the running peer at {self.url} did not answer: {exc}")
        if response.status_code not in expect:
            fail(_error_text(response))
        return response

    def get_json(self, path: str, **kw: Any) -> Any:
        return self.call("GET", path, **kw).json()


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        error = error.get("message")
    return str(error or f"HTTP {response.status_code} from the running peer")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_holder(config: Config) -> str:
    """The pid the data dir's lock holder wrote into ``peer.lock`` (see ``peer.dirlock``)."""
    try:  # peer.node.PEER_LOCK (not imported: it pulls in libp2p)
        with (config.data_dir / "peer.lock").open("rb") as f:
            return f.read(32).decode(errors="replace").strip()
    except OSError:
        return ""


def running_peer(config: Config) -> LocalApi | None:
    """The control API of the peer that runs from this data dir, or None."""
    from peer.http.auth import TokenError, read_token, token_path
    from peer.http.server import endpoint_path
    from peer.identity import IdentityError, load_or_create_identity, peer_id_of

    marker = endpoint_path(config.data_dir)
    try:
        with marker.open("rb") as f:
            info = json.loads(f.read(MAX_MARKER_BYTES))
        url, pid = str(info["url"]), int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _alive(pid) or _lock_holder(config) != str(pid):
        return None  # a peer that was killed: its marker stayed behind
    try:
        token = read_token(token_path(config.data_dir))
        me = peer_id_of(load_or_create_identity(config.key_path))
    except (TokenError, IdentityError) as exc:
        fail(str(exc))
    try:
        with httpx.Client(base_url=url, trust_env=False, timeout=PROBE_TIMEOUT) as client:
            answer = client.get("/v2").json()
    except (httpx.HTTPError, ValueError):
        return None
    peer_id = answer.get("parameters", {}).get("peer_id") if isinstance(answer, dict) else None
    if peer_id != me:
        return None  # something else answers on that port now
    return LocalApi(url=url, token=token, peer_id=me)
