"""A requester app for the lab (run in a namespace): N jobs over a lease, reopened if it breaks.

    python tests/reach/lease_client.py BOOTSTRAP[,BOOTSTRAP] DATA_DIR N

Prints one JSON line per job: {"i", "executor", "via"} where ``via`` is the relay
peer id the connection to the executor goes through (null when direct).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import trio
from libp2p.peer.id import ID

from peer.config import load_config
from peer.node import open_peer


def via(peer: object, executor: str) -> str | None:
    conns = peer.host.get_network().get_connections(ID.from_base58(executor))  # type: ignore[attr-defined]
    for c in conns:
        for a in c.get_transport_addresses():
            text = str(a)
            if "/p2p-circuit" in text:
                return text.split("/p2p-circuit")[0].rsplit("/p2p/", 1)[1]
    return None


async def main(boots: str, data_dir: str, n: int) -> None:
    config = load_config(cli={"bootstrap": boots.split(","), "data_dir": data_dir, "listen": []})
    x = np.arange(4, dtype=np.float32)
    done = 0
    async with open_peer(config, role="client", market=True) as peer:
        for _attempt in range(6):
            if done >= n:
                break
            try:
                async with peer.lease("tiny_add", max_jobs=n, seconds=300, max_price=5.0) as lease:
                    while done < n:
                        await lease.infer({"x": x, "y": x})
                        executor = lease.executor
                        print(
                            json.dumps(
                                {"i": done, "executor": executor, "via": via(peer, executor)}
                            ),
                            flush=True,
                        )
                        done += 1
                        await trio.sleep(0.2)
            except Exception as exc:  # the relay went away: open a new lease
                print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)
    print(json.dumps({"done": done}), flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
