"""Connection limits: a bootstrap node admits every joining peer; an edge peer stays small."""

from __future__ import annotations

from peer.host import connection_config


def inbound_slots(cfg: object) -> int:
    # py-libp2p's swarm admits max_connections - min_connections inbound connections and
    # closes the rest before multistream (libp2p.network.swarm: _inbound_limiter).
    return cfg.max_connections - cfg.min_connections  # type: ignore[attr-defined, no-any-return]


def test_a_bootstrap_node_admits_a_large_swarm() -> None:
    # 128 (an edge peer's cap) turned ~80 of a 200-peer swarm away at the bootstrap node.
    assert inbound_slots(connection_config(bootstrap=True)) >= 4000


def test_an_edge_peer_keeps_few_connections() -> None:
    cfg = connection_config()
    assert cfg.max_connections == 128 and cfg.high_watermark <= 96
