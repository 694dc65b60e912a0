"""A requester app for the lab (run in a home): a lease whose jobs start on the relay, a hole
punch mid-lease, the lease's later jobs, then one single job.

    python tests/reach/punch_client.py BOOTSTRAP[,BOOTSTRAP] DATA_DIR N

It listens on TCP (a hole punch dials from the listen port) and punches only when
told: after job N // 2 of the lease. Its automatic punch after a relayed dial
(``HolePunch.request``, which may come while the peer starts: discovery dials
the executor) is gated here, so the lease's first jobs surely run on the relay.
Prints JSON lines:
``{"i", "executor", "route"}`` per lease job (``route``: the address of the
connection the lease's job stream is on, ``/p2p-circuit`` when relayed),
``{"punch": {"ok", "seconds", "addr"}}`` after the punch,
``{"receipts": [count, ...], "moves": {executor: n}}`` once the lease is closed, and
``{"single": {"executor", "conn"}}`` for the single job (``conn``: the address of
the connection its job stream went over).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np
import trio
from libp2p.peer.id import ID

from peer.caps import JOB
from peer.config import load_config
from peer.logging_setup import setup_logging
from peer.node import open_peer
from peer.reach.dcutr import HolePunch
from peer.reach.routes import StreamRoutes

PUNCH_WAIT = 60.0
ALLOWED: set[ID] = set()  # peers we may punch to now
_request = HolePunch.request


def _gated(self: HolePunch, peer_id: ID) -> None:
    if peer_id in ALLOWED:
        _request(self, peer_id)


HolePunch.request = _gated  # type: ignore[method-assign]


def say(**kw: Any) -> None:
    print(json.dumps(kw), flush=True)


async def main(boots: str, data_dir: str, n: int) -> None:
    setup_logging(os.environ.get("PUNCH_CLIENT_LOG", "INFO"))  # to stderr: the test's log file
    config = load_config(
        cli={"bootstrap": boots.split(","), "data_dir": data_dir, "listen": ["/ip4/0.0.0.0/tcp/0"]}
    )
    x = np.arange(4, dtype=np.float32)
    routes = StreamRoutes()
    async with open_peer(config, role="client", market=True) as peer:
        punch = peer.reach.punch
        assert punch is not None, "no hole punching on this peer"
        peer.host.get_network().register_notifee(routes)
        async with peer.lease("tiny_add", max_jobs=n, seconds=300, max_price=5.0) as lease:
            for i in range(n):
                await lease.infer({"x": x, "y": x})
                executor = lease.executor
                assert executor is not None
                say(i=i, executor=executor, route=lease.route)
                if i == n // 2 - 1:
                    ALLOWED.add(ID.from_base58(executor))
                    punch.request(ID.from_base58(executor))
                    with trio.fail_after(PUNCH_WAIT):
                        while executor not in punch.results:
                            await punch.changed.wait()
                    got = punch.results[executor]
                    say(punch={"ok": got.ok, "seconds": got.seconds, "addr": got.addr})
        say(receipts=[r.count for r in lease.receipts], moves=lease.moves)
        result = await peer.infer("tiny_add", {"x": x, "y": x}, max_price=5.0, deadline=30)
        say(single={"executor": result.executor, "conn": routes.last(result.executor, JOB)})


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
