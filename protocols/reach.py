"""Address choice for dialing and advertising: pure functions over multiaddr text.

A peer's addresses come from untrusted places (its ad, identify, DHT answers),
so everything here is bounded and total: an address we cannot parse is
skipped, never an error. Only the forms we can dial are understood:

* ``/ip4/A/tcp/P[/p2p/ID]`` and ``/ip6/A/tcp/P[/p2p/ID]``: direct TCP;
* ``/dns4|dns6|dns/NAME/tcp/P[/p2p/ID]``: direct TCP through DNS (ranked as public);
* ``<direct relay address>/p2p/RELAY/p2p-circuit[/p2p/ID]``: circuit relay v2.

Ranking (``rank_dial_addrs``), best first:

1. a direct address in one of our own subnets (the same LAN: shortest path);
2. public direct addresses (and DNS names);
3. other private direct addresses (RFC 1918, carrier NAT 100.64/10, ULA);
4. loopback, only when the peer offers no other direct address (it then
   listens on loopback only, so it can only be on this machine, and a
   wrong guess fails fast); a remote peer's loopback is never dialed;
5. relayed (``/p2p-circuit``) addresses.

Unspecified (0.0.0.0, ::), link-local and multicast addresses are never dialed.
The order inside a class is the order the peer gave (its own preference).

No I/O here: our interfaces are passed in as ``ipaddress`` networks.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Scope = Literal["loopback", "private", "public", "unusable"]

MAX_ADDR_LEN = 512  # longer texts are skipped (multiaddrs we can dial are ~100 chars)
MAX_DIAL_ADDRS = 12  # a peer may list many; we try at most this many per dial
MAX_ANNOUNCE = 8

# Carrier-grade NAT space (RFC 6598) is private too; ipaddress calls it neither.
_CGNAT = ipaddress.ip_network("100.64.0.0/10")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

CLASS_SAME_SUBNET = 0
CLASS_PUBLIC = 1
CLASS_PRIVATE = 2
CLASS_LOOPBACK = 3
CLASS_RELAY = 4


@dataclass(frozen=True)
class DialAddr:
    """One parsed address. ``text`` never carries the final ``/p2p/<peer id>``."""

    text: str
    host: str  # an IP literal or a DNS name (of the relay, for a circuit address)
    port: int
    is_dns: bool = False
    relay: str | None = None  # relay peer id for a /p2p-circuit address

    @property
    def circuit(self) -> bool:
        return self.relay is not None


def _direct(parts: Sequence[str]) -> tuple[str, int, bool] | None:
    """(host, port, is_dns) of ``ip4|ip6|dns*/HOST/tcp/PORT`` (exactly four parts)."""
    if len(parts) != 4 or parts[2] != "tcp":
        return None
    kind, host, _, port_text = parts
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    if kind in ("ip4", "ip6"):
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        if (kind == "ip4") != (ip.version == 4):
            return None
        return str(ip), int(port_text), False
    if kind in ("dns", "dns4", "dns6") and 0 < len(host) <= 253:
        return host, int(port_text), True
    return None


def parse_dial_addr(text: str, peer_id: str | None = None) -> DialAddr | None:
    """Parse ``text``; None when we cannot dial it or it names another peer than ``peer_id``."""
    if not isinstance(text, str) or len(text) > MAX_ADDR_LEN or not text.startswith("/"):
        return None
    parts = text[1:].split("/")
    # Strip a trailing /p2p/<id>: it must be the peer we want.
    if len(parts) >= 2 and parts[-2] == "p2p":
        if peer_id is not None and parts[-1] != peer_id:
            return None
        parts = parts[:-2]
    if parts and parts[-1] == "p2p-circuit":
        if len(parts) != 7 or parts[4] != "p2p" or not parts[5]:
            return None
        relay_id = parts[5]
        if peer_id is not None and relay_id == peer_id:
            return None  # a peer relaying to itself
        direct = _direct(parts[:4])
        if direct is None:
            return None
        host, port, is_dns = direct
        return DialAddr("/" + "/".join(parts), host, port, is_dns, relay_id)
    direct = _direct(parts)
    if direct is None:
        return None
    host, port, is_dns = direct
    return DialAddr("/" + "/".join(parts), host, port, is_dns)


def ip_scope(host: str) -> Scope:
    """How far an address reaches: loopback, private (LAN/NAT), public, or unusable."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "public"  # a DNS name: the operator published it for others
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip_scope(str(ip.ipv4_mapped))
    if ip.is_loopback:
        return "loopback"
    if ip.is_unspecified or ip.is_link_local or ip.is_multicast or ip.is_reserved:
        return "unusable"
    if ip in _CGNAT or ip.is_private:
        return "private"
    if ip.is_global:
        return "public"
    return "unusable"  # documentation ranges and the like


def _in_networks(host: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip.version == n.version and ip in n for n in networks)


def dial_class(addr: DialAddr, local_networks: Sequence[Network]) -> int | None:
    """The rank class of ``addr`` (see the module docstring); None: never dial it."""
    if addr.circuit:
        return CLASS_RELAY if ip_scope(addr.host) not in ("unusable",) else None
    scope = ip_scope(addr.host)
    if scope == "unusable":
        return None
    if scope == "loopback":
        return CLASS_LOOPBACK
    if not addr.is_dns and _in_networks(addr.host, local_networks):
        return CLASS_SAME_SUBNET
    return CLASS_PUBLIC if scope == "public" else CLASS_PRIVATE


def rank_dial_addrs(
    addrs: Iterable[str],
    peer_id: str,
    local_networks: Sequence[Network] = (),
    *,
    limit: int = MAX_DIAL_ADDRS,
    scan: int = 64,
) -> list[DialAddr]:
    """The addresses of ``peer_id`` worth dialing, best first, deduplicated, at most ``limit``.

    Only the first ``scan`` entries of ``addrs`` are looked at (untrusted input).
    """
    seen: set[str] = set()
    ranked: list[tuple[int, int, DialAddr]] = []
    for i, text in enumerate(addrs):
        if i >= scan:
            break
        addr = parse_dial_addr(text, peer_id)
        if addr is None or addr.text in seen:
            continue
        seen.add(addr.text)
        cls = dial_class(addr, local_networks)
        if cls is not None:
            ranked.append((cls, i, addr))
    ranked.sort(key=lambda t: (t[0], t[1]))
    if any(cls < CLASS_LOOPBACK for cls, _, _ in ranked):
        ranked = [t for t in ranked if t[0] != CLASS_LOOPBACK]
    return [a for _, _, a in ranked[:limit]]


def advertised_addrs(
    listen: Iterable[str],
    *,
    announce: Sequence[str] = (),
    confirmed: Sequence[str] = (),
    relayed: Sequence[str] = (),
    limit: int = 16,
) -> list[str]:
    """What we tell others to dial, without ``/p2p/<our id>``: usable addresses only.

    ``announce`` (operator-given, e.g. a port forward) comes first, then
    ``confirmed`` (observed addresses AutoNAT confirmed), then our concrete
    listen addresses that others can use (loopback and unusable ones dropped;
    loopback kept only when we listen on nothing else), then ``relayed``
    (``/p2p-circuit`` addresses of our relay reservations).
    """
    out: list[str] = []

    def add(text: str) -> None:
        a = parse_dial_addr(text)
        if a is not None and a.text not in out and len(out) < limit:
            out.append(a.text)

    for text in announce:
        add(text)
    for text in confirmed:
        add(text)
    parsed = [a for a in (parse_dial_addr(t) for t in listen) if a is not None]
    usable = [a for a in parsed if not a.circuit and ip_scope(a.host) in ("public", "private")]
    if not usable and not out:  # listening on loopback only: a swarm on one machine
        usable = [a for a in parsed if ip_scope(a.host) == "loopback"]
    for a in usable:
        add(a.text)
    for text in relayed:
        add(text)
    return out


MAX_PUNCH_ADDRS = 8  # addresses of a DCUtR CONNECT we dial in a hole punch


def punch_addrs(
    addrs: Iterable[str], peer_id: str = "", *, limit: int = MAX_PUNCH_ADDRS, scan: int = 32
) -> list[str]:
    """The addresses from a peer's DCUtR CONNECT (its observed addresses) worth dialing.

    The list is untrusted and every entry becomes a dial, so only direct TCP
    addresses on an IP literal (a NAT's public side, or a LAN address) are kept:
    never DNS names, relays, loopback, unspecified, link-local or multicast
    addresses, nor one naming another peer than ``peer_id`` (a trailing
    ``/p2p/<peer_id>`` is dropped; with ``peer_id=""`` no address may name a
    peer). Deduplicated, in the peer's order, at most ``limit``; only the first
    ``scan`` entries are looked at.
    """
    out: list[str] = []
    for i, text in enumerate(addrs):
        if i >= scan or len(out) >= limit:
            break
        a = parse_dial_addr(text, peer_id)
        if a is None or a.circuit or a.is_dns:
            continue
        if ip_scope(a.host) in ("public", "private") and a.text not in out:
            out.append(a.text)
    return out
