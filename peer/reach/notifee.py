"""``QuietNotifee``: a swarm notifee that ignores every event; subclasses override the few
they need (py-libp2p's ``INotifee`` makes all six abstract)."""

from __future__ import annotations

from typing import Any

from libp2p.abc import INetConn, INetStream, INotifee
from multiaddr import Multiaddr


class QuietNotifee(INotifee):
    async def opened_stream(self, network: Any, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: Any, stream: INetStream) -> None:
        pass

    async def connected(self, network: Any, conn: INetConn) -> None:
        pass

    async def disconnected(self, network: Any, conn: INetConn) -> None:
        pass

    async def listen(self, network: Any, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Multiaddr) -> None:
        pass
