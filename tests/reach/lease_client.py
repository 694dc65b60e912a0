"""A requester app for the lab (run in a namespace): N jobs over a lease, reopened if it breaks.

    python tests/reach/lease_client.py BOOTSTRAP[,BOOTSTRAP] DATA_DIR N

Prints one JSON line per job: {"i", "executor", "via", "t"} where ``via`` is the
relay peer id the lease's job stream goes through (null when direct) and ``t``
the seconds since start; at the end {"punch": {"ok", "addr"} or null, "t"}, the
hole punch to the last executor (it listens on TCP, so it punches after a
relayed dial).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import trio

from peer.config import load_config
from peer.logging_setup import setup_logging
from peer.node import open_peer
from peer.reach.routes import relay_of

PUNCH_WAIT = 60.0


async def main(boots: str, data_dir: str, n: int) -> None:
    setup_logging("INFO")  # to stderr: the test's log file
    listen = ["/ip4/0.0.0.0/tcp/0"]  # so that it punches holes (DCUtR) where it can
    config = load_config(
        cli={"bootstrap": boots.split(","), "data_dir": data_dir, "listen": listen}
    )
    x = np.arange(4, dtype=np.float32)
    done = 0
    executor: str | None = None
    t0 = trio.current_time()
    async with open_peer(config, role="client", market=True) as peer:
        for _attempt in range(6):
            if done >= n:
                break
            try:
                async with peer.lease("tiny_add", max_jobs=n, seconds=300, max_price=5.0) as lease:
                    while done < n:
                        await lease.infer({"x": x, "y": x})
                        executor = lease.executor
                        route = lease.route or ""
                        t = round(trio.current_time() - t0, 2)
                        line = {"i": done, "executor": executor, "via": relay_of(route), "t": t}
                        print(json.dumps(line), flush=True)
                        done += 1
                        await trio.sleep(0.2)
            except Exception as exc:  # the relay went away: open a new lease
                why = f"{type(exc).__name__}: {exc}"[:300]
                t = round(trio.current_time() - t0, 2)
                print(json.dumps({"error": why, "t": t}), flush=True)
        punch = peer.reach.punch
        outcome = None
        if punch is not None and executor is not None:
            with trio.move_on_after(PUNCH_WAIT):  # the punch after the relayed dial, if any
                while executor not in punch.results:
                    await punch.changed.wait()
            got = punch.results.get(executor)
            outcome = None if got is None else {"ok": got.ok, "addr": got.addr}
        print(json.dumps({"punch": outcome, "t": round(trio.current_time() - t0, 2)}), flush=True)
    print(json.dumps({"done": done}), flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
