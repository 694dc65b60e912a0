"""The identity proof-of-work search, in a child process at low priority.

Pure-Python hashing holds the GIL: searched in a thread, a 27-bit proof (about a
CPU-minute) slowed the peer's whole event loop (a 1 ms ``trio.sleep`` overshot by
31 ms at p99), enough to make relayed jobs miss their deadlines. A child process
leaves the loop alone, and ``nice`` keeps it behind the peer's own work.

    python -m peer.settlement.pow_search PEER_ID BITS START

prints the nonce found (or nothing) and exits 0.
"""

from __future__ import annotations

import os
import subprocess
import sys

import trio

from protocols.ledger import solve_pow

MAX_NONCE = 1 << 48
_NICENESS = 10


async def search_in_process(peer_id: str, bits: int, start: int) -> int | None:
    """The first nonce from ``start`` that proves ``peer_id`` at ``bits`` (None: none below
    2**48). Cancelling the caller kills the child."""
    argv = [sys.executable, "-m", "peer.settlement.pow_search", peer_id, str(bits), str(start)]
    done = await trio.run_process(argv, capture_stdout=True, stderr=subprocess.DEVNULL)
    out = done.stdout.decode().strip()
    return int(out) if out else None


def main(argv: list[str]) -> int:
    peer_id, bits, start = argv[0], int(argv[1]), int(argv[2])
    os.nice(_NICENESS)
    nonce = solve_pow(peer_id, bits, start=start, max_tries=MAX_NONCE - start)
    if nonce is not None:
        print(nonce, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
