"""A requester app for the lab (run in a home): N single jobs, hole punching after the first.

    python tests/reach/punch_client.py BOOTSTRAP[,BOOTSTRAP] DATA_DIR N

It listens on TCP (a hole punch dials from the listen port). Prints JSON lines:
``{"i", "executor", "conn"}`` per job, where ``conn`` is the address of the
connection the job's stream went over (``/p2p-circuit`` when relayed), and
``{"punch": {"ok", "seconds", "addr"}}`` once the punch after job 0 is done.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np
import trio
from libp2p.abc import INotifee

from peer.caps import JOB
from peer.config import load_config
from peer.logging_setup import setup_logging
from peer.node import open_peer

PUNCH_WAIT = 60.0


class Streams(INotifee):
    """Every stream this host opens, with the address of the connection it is on."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, str]] = []

    async def opened_stream(self, network: Any, stream: Any) -> None:
        if len(self.seen) < 10_000:
            addrs = stream.muxed_conn.get_transport_addresses()
            self.seen.append((stream, str(addrs[0]) if addrs else ""))

    def job_conns(self) -> list[str]:
        """Connection addresses of the job streams opened since the last call."""
        out = [addr for s, addr in self.seen if s.get_protocol() == JOB]
        self.seen = [(s, a) for s, a in self.seen if s.get_protocol() is None]
        return out

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def connected(self, network: Any, conn: Any) -> None:
        pass

    async def disconnected(self, network: Any, conn: Any) -> None:
        pass

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass


def say(**kw: Any) -> None:
    print(json.dumps(kw), flush=True)


async def main(boots: str, data_dir: str, n: int) -> None:
    setup_logging(os.environ.get("PUNCH_CLIENT_LOG", "INFO"))  # to stderr: the test's log file
    config = load_config(
        cli={"bootstrap": boots.split(","), "data_dir": data_dir, "listen": ["/ip4/0.0.0.0/tcp/0"]}
    )
    x = np.arange(4, dtype=np.float32)
    streams = Streams()
    async with open_peer(config, role="client", market=True) as peer:
        assert peer.reach.punch is not None, "no hole punching on this peer"
        peer.host.get_network().register_notifee(streams)
        for i in range(n):
            result = await peer.infer("tiny_add", {"x": x, "y": x}, max_price=5.0, deadline=30)
            say(i=i, executor=result.executor, conn=streams.job_conns())
            if i == 0:
                with trio.fail_after(PUNCH_WAIT):
                    while result.executor not in peer.reach.punch.results:
                        await peer.reach.punch.changed.wait()
                punch = peer.reach.punch.results[result.executor]
                say(punch={"ok": punch.ok, "seconds": punch.seconds, "addr": punch.addr})


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
