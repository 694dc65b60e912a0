"""What this peer advertises (identify, its capability ad): only addresses others can use.

``Advertiser`` is handed to py-libp2p as the host's ``addrs_factory`` (so
identify tells peers the same thing the ad does) and feeds the ad. It merges,
in this order (``protocols.reach.advertised_addrs``):

* ``announce``: operator-given addresses (``--announce``, e.g. a port forward);
* ``confirmed``: observed addresses that AutoNAT confirmed reachable;
* our listen addresses with wildcards expanded to each interface, loopback
  dropped unless it is all we listen on;
* ``relayed``: ``/p2p-circuit`` addresses of our relay reservations.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from libp2p.abc import IHost
from multiaddr import Multiaddr

from protocols.reach import MAX_ANNOUNCE, advertised_addrs, parse_dial_addr


class AnnounceError(ValueError):
    """An ``--announce`` address we cannot advertise."""


def check_announce(values: Sequence[str]) -> tuple[str, ...]:
    """Validate operator-given announce addresses (TCP, no wildcard, at most ``MAX_ANNOUNCE``)."""
    if len(values) > MAX_ANNOUNCE:
        raise AnnounceError(f"at most {MAX_ANNOUNCE} announce addresses, got {len(values)}")
    out = []
    for text in values:
        addr = parse_dial_addr(text)
        if addr is None or addr.circuit:
            raise AnnounceError(
                f"{text!r} is not an address others can dial; give a TCP multiaddr such as "
                "/ip4/203.0.113.7/tcp/4001 or /dns4/box.example.org/tcp/4001"
            )
        if not addr.is_dns and ipaddress.ip_address(addr.host).is_unspecified:
            raise AnnounceError(f"{text!r} is a wildcard; announce the address others dial")
        out.append(addr.text)
    return tuple(out)


def expand_listen(addrs: Iterable[Multiaddr]) -> list[str]:
    """Listen addresses with wildcards (0.0.0.0, ::) expanded to every interface."""
    from libp2p.utils.address_validation import expand_wildcard_address

    out: list[str] = []
    for addr in addrs:
        text = str(addr)
        parsed = parse_dial_addr(text)
        expanded = [addr]
        wildcard = parsed is not None and not parsed.is_dns and not parsed.circuit
        if wildcard and parsed is not None and ipaddress.ip_address(parsed.host).is_unspecified:
            expanded = expand_wildcard_address(addr)
        for a in expanded:
            if str(a) not in out:
                out.append(str(a))
    return out


class Advertiser:
    """Mutable inputs of our advertised addresses; ``addrs()`` is the current answer."""

    def __init__(self, announce: Sequence[str] = ()) -> None:
        self.announce: tuple[str, ...] = check_announce(announce)
        self.confirmed: list[str] = []
        self.relayed: list[str] = []
        self.host: IHost | None = None  # set once the host exists

    def listen(self) -> list[Multiaddr]:
        """Our transport (listen) addresses; observed ones count only once AutoNAT confirms them."""
        return list(self.host.get_transport_addrs()) if self.host is not None else []

    def addrs(self) -> list[str]:
        """Advertised addresses (no ``/p2p/<id>`` suffix)."""
        listen = expand_listen(self.listen())
        return advertised_addrs(
            listen, announce=self.announce, confirmed=self.confirmed, relayed=self.relayed
        )

    def factory(self, candidates: list[Multiaddr]) -> list[Multiaddr]:
        """py-libp2p ``addrs_factory``: what identify tells other peers.

        The candidates (listen + identify-observed addresses) are ignored: an
        address someone observed is advertised only once AutoNAT confirmed it.
        """
        return [Multiaddr(a) for a in self.addrs()]
