"""An error raised in the body of ``async with open_peer(...)`` reaches the caller.

py-libp2p's ``background_trio_service`` (the hole-punching service runs under one) awaits
``manager.stop()`` in a ``finally``; the Cancelled raised there replaced the body's error and
a cancelled nursery swallowed it, so every assertion inside an ``open_peer`` block passed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from settlement_helpers import key, pid

from peer.config import Config
from peer.node import open_peer


class Marker(Exception):
    pass


@pytest.mark.parametrize("role", ["peer", "client"])
async def test_an_error_in_the_body_is_not_swallowed(tmp_path: Path, role: str) -> None:
    config = Config(
        data_dir=tmp_path / role,
        listen=("/ip4/127.0.0.1/tcp/0",),
        ledger_witnesses=(pid(key(6)),),
    )
    with pytest.raises(Marker):
        async with open_peer(config, key=key(5), role=role):  # type: ignore[arg-type]
            raise Marker("from the body")
