"""A service that stops while a peer is negotiating its protocol must not take the host down.

py-libp2p 0.8.1's multiselect checks ``protocol in handlers``, awaits a write, then indexes
``handlers[protocol]``; a ``remove_stream_handler`` in between raised KeyError inside the
swarm (seen in test_settlement_fraud). ``retire_stream_handler`` swaps in a handler that
resets the stream instead.
"""

from __future__ import annotations

from typing import Any

import nacl.signing
import pytest
import trio
from libp2p.custom_types import TProtocol

from peer.host import build_host, connect, retire_stream_handler, running_host

LOCAL = ["/ip4/127.0.0.1/tcp/0"]
GONE = TProtocol("/edgeswarm/test-retired/1")
ALIVE = TProtocol("/edgeswarm/test-alive/1")


async def _echo(stream: Any) -> None:
    data = await stream.read(16)
    await stream.write(data)
    await stream.close()


async def test_a_handler_retired_mid_negotiation_resets_the_stream_and_the_host_lives() -> None:
    server = build_host(nacl.signing.SigningKey.generate())
    client = build_host(nacl.signing.SigningKey.generate())
    server.set_stream_handler(GONE, _echo)
    server.set_stream_handler(ALIVE, _echo)
    mux = server.get_mux()

    class RetireAfterCheck(dict[Any, Any]):
        """The service stops right after multiselect found its protocol (the race)."""

        def __contains__(self, key: object) -> bool:
            found = super().__contains__(key)
            if found and key == GONE:
                retire_stream_handler(server, GONE)
            return found

    mux.handlers = RetireAfterCheck(mux.handlers)
    with trio.fail_after(30):
        async with running_host(server, LOCAL) as addrs, running_host(client, LOCAL):
            await connect(client, f"{addrs[0]}/p2p/{server.get_id()}")
            stream = await client.new_stream(server.get_id(), [GONE])
            with pytest.raises(Exception):  # noqa: B017 - reset surfaces as a stream error
                await stream.write(b"hello")
                assert await stream.read(16) == b""
                raise ConnectionError("retired stream was served")
            # The host survived: another protocol still answers.
            ok = await client.new_stream(server.get_id(), [ALIVE])
            await ok.write(b"ping")
            assert await ok.read(16) == b"ping"
