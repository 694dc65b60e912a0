"""The server side of ``/edgeswarm/ledger/1``: one handler per stream, typed dispatch.

Requests are decoded and validated by ``protocols.ledger_rpc.decode_request``;
``certify`` and ``certify_many`` go to the ``WitnessServer``, ``push``/``sync``/``get``
to ``FactSync``.
A bad request gets an error reply (the stream stays usable); an oversize or
malformed frame gets one and closes the stream; a stream idle for
``stream_idle_timeout`` is closed.
"""

from __future__ import annotations

import logging
from contextlib import suppress
from typing import Any

import trio
from libp2p.abc import IHost, INetStream

from peer.caps import guarded
from peer.host import retire_stream_handler
from peer.ledger_store import StoreError
from peer.settlement.base import SettlementConfig, SettlementError, Stats
from peer.settlement.fact_sync import FactSync, SyncSession
from peer.settlement.ledger_rpc import PROTOCOL_ID, Channel
from peer.settlement.witness_server import WitnessServer
from protocols.codec import decode
from protocols.errors import ProtocolError
from protocols.ledger_rpc import (
    MAX_FRAME,
    Certify,
    CertifyMany,
    ErrorReply,
    Get,
    GetCheckpoint,
    Push,
    Reply,
    SignCheckpoint,
    Sync,
    decode_request,
)

log = logging.getLogger(__name__)

MAX_REQUESTS_PER_STREAM = 100_000


class StreamState:
    """What one inbound stream holds between requests (its reconciliation, if any)."""

    def __init__(self, peer: str = "?") -> None:
        self.sync: SyncSession | None = None
        self.peer = peer  # the remote peer id (its budget pays for what it pushes)


class LedgerServer:
    """Serves ``/edgeswarm/ledger/1`` for the witness and fact-sync roles."""

    def __init__(
        self,
        host: IHost | None,
        witness: WitnessServer,
        fact_sync: FactSync,
        config: SettlementConfig,
        stats: Stats,
    ) -> None:
        self.host = host
        self.witness = witness
        self.fact_sync = fact_sync
        self.config = config
        self.stats = stats
        self._handlers: set[trio.CancelScope] = set()
        self._closed = False

    async def answer(self, data: bytes, state: StreamState) -> dict[str, Any]:
        """The reply (a plain value to encode) to one request frame; never raises a
        ``ProtocolError``: a bad request gets an error reply."""
        reply: Reply
        try:
            req = decode_request(decode(data, max_size=MAX_FRAME))
            match req:
                case Certify():
                    reply = await self.witness.certify(req)
                case CertifyMany():
                    reply = await self.witness.certify_many(req)
                case Push():
                    reply = await self.fact_sync.answer_push(req, state.peer)
                case Sync():
                    if state.sync is None:
                        state.sync = self.fact_sync.open_sync_session()
                    reply = self.fact_sync.answer_sync(req, state.sync)
                case Get():
                    reply = self.fact_sync.answer_get(req)
                case GetCheckpoint():
                    reply = self.fact_sync.answer_checkpoint(req)
                case SignCheckpoint():
                    reply = self.fact_sync.answer_sign(req)
        except ProtocolError as exc:
            reply = ErrorReply(str(exc))
        return reply.to_wire()

    async def handle_stream(self, stream: INetStream) -> None:
        remote = "?"
        with suppress(Exception):
            remote = str(stream.muxed_conn.peer_id)
        ch = Channel(stream, remote)
        state = StreamState(remote)
        with trio.CancelScope() as scope:
            self._handlers.add(scope)
            try:
                for _ in range(MAX_REQUESTS_PER_STREAM):
                    if self._closed:
                        break
                    data = None
                    with trio.move_on_after(self.config.stream_idle_timeout):
                        data = await ch.read_frame()
                    if data is None:
                        break  # end of stream, or idle for too long
                    await ch.write(await self.answer(data, state))
            except ProtocolError as exc:  # oversize or malformed frame: say why, then close
                self.stats.handler_errors += 1
                with suppress(Exception):
                    await ch.write(ErrorReply(str(exc)).to_wire())
            except (SettlementError, StoreError) as exc:
                self.stats.handler_errors += 1
                log.debug("ledger stream from %s: %s", remote, exc)
            except Exception as exc:  # a libp2p stream error: the peer went away
                log.debug("ledger stream from %s failed: %r", remote, exc)
            finally:
                self._handlers.discard(scope)
                if state.sync is not None:
                    self.fact_sync.close_sync_session(state.sync)
                await ch.close()

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; then stop every open handler."""
        assert self.host is not None
        # Per-peer stream cap (peer.caps): a stream over it is reset at once.
        self.host.set_stream_handler(
            PROTOCOL_ID, guarded(self.host, PROTOCOL_ID, self.handle_stream)
        )
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._closed = True
            try:
                retire_stream_handler(self.host, PROTOCOL_ID)
            except Exception:
                log.debug("removing the ledger handler failed", exc_info=True)
            for scope in list(self._handlers):
                scope.cancel()
