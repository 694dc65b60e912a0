"""A small internet in Linux network namespaces, for multi-host tests of ``edgeswarm`` processes.

Everything lives in namespaces this lab creates (nothing is added to the
machine's own namespace, no address outside them is ever a target)::

    inet (router of the public side: bridge br0 10.77.0.1/24; 10.99.0.0/16 is a
    |     black hole: packets to it vanish, like an address behind a firewall)
    +-- public host  <lab>-<name>   eth0 10.77.0.N/24   (bootstrap nodes, public peers)
    +-- NAT router   <lab>-r<i>     wan 10.77.0.(100+i) -- masquerade -- lan 192.168.(60+i).1
            +-- home <lab>-<name>   eth0 192.168.(60+i).2/24, default via the router

A home can dial out; nobody can dial into it (no port forwards: the router
forwards only packets of connections made from inside). A router refuses an
unsolicited connection (TCP reset), or with ``drops=True`` drops it silently,
as most home routers and carrier NATs do. Hole punching (DCUtR) needs the
second kind here: the lab has no latency (this kernel has no ``netem``), so the
two sides' SYNs never cross in flight, and a reset kills the first one. A
router keeps a connection's source port when it is free (so the public port of
a listen port is predictable, as with most home routers), or with
``random_ports=True`` gives each connection a random public port
(``MASQUERADE --random-fully``: a symmetric NAT, like many carrier NATs), which
defeats hole punching. A public host may
get an extra, unreachable address first (``dead_first=True``), so it lists
two addresses of which only the second works.

Needs root, ``ip`` (iproute2) and ``iptables``; ``unavailable()`` says why the
lab cannot run here (tests skip with that reason). Namespace names carry the
pid and a counter, so labs of parallel test runs never collide; ``close()``
kills every process left in them and deletes every namespace, also after a
failure.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

INSTALL_HINT = "apt-get install -y iptables iproute2"
PUBLIC_NET = "10.77.0"
DEAD_NET = "10.99"
_counter = itertools.count()


class LabError(RuntimeError):
    """A lab command failed (the message has the command and its stderr)."""


def _sh(cmd: list[str], *, check: bool = True) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if check and r.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r.stdout


def unavailable() -> str | None:
    """None when the lab can be built here, else the reason (and how to fix it)."""
    missing = [tool for tool in ("ip", "iptables") if shutil.which(tool) is None]
    if missing:
        return f"the network lab needs {' and '.join(missing)} ({INSTALL_HINT}) and root"
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces)"
    name = f"esprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return f"cannot create network namespaces: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    probe = subprocess.run(
        ["iptables", "-t", "nat", "-L", "-n"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        return f"iptables does not work here ({probe.stderr.strip()[:200]}); {INSTALL_HINT}"
    return None


@dataclass
class Host:
    name: str
    ns: str
    ip: str
    dead_ip: str | None = None
    wan: str | None = None  # a home's public address (its router's WAN side)

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]


@dataclass
class Lab:
    prefix: str = field(default_factory=lambda: f"es{os.getpid()}x{next(_counter)}")
    namespaces: list[str] = field(default_factory=list)
    hosts: dict[str, Host] = field(default_factory=dict)
    _public_n: int = 1
    _homes_n: int = 0

    @property
    def inet(self) -> str:
        return f"{self.prefix}-inet"

    def _ns(self, name: str) -> str:
        ns = f"{self.prefix}-{name}"
        _sh(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        self.exec(ns, "ip", "link", "set", "lo", "up")
        return ns

    def exec(self, ns: str, *cmd: str, check: bool = True) -> str:
        return _sh(["ip", "netns", "exec", ns, *cmd], check=check)

    def _veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
        _sh(["ip", "link", "add", name_a, "netns", ns_a, "type", "veth", "peer", "name", name_b,
             "netns", ns_b])  # fmt: skip
        self.exec(ns_a, "ip", "link", "set", name_a, "up")
        self.exec(ns_b, "ip", "link", "set", name_b, "up")

    def build(self) -> None:
        ns = self._ns("inet")
        self.exec(ns, "ip", "link", "add", "br0", "type", "bridge")
        self.exec(ns, "ip", "addr", "add", f"{PUBLIC_NET}.1/24", "dev", "br0")
        self.exec(ns, "ip", "link", "set", "br0", "up")
        self.exec(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # Unreachable addresses: packets there vanish (no refusal), so a dial hangs.
        self.exec(ns, "ip", "route", "add", "blackhole", f"{DEAD_NET}.0.0/16")

    def _attach(self, ns: str, port: str, ip: str) -> None:
        """A veth from ``ns`` (eth0 = ``ip``) into the public bridge."""
        self._veth(ns, "eth0", self.inet, port)
        self.exec(self.inet, "ip", "link", "set", port, "master", "br0")
        self.exec(ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")

    def public(self, name: str, *, dead_first: bool = False) -> Host:
        """A host on the public side; ``dead_first``: its first interface is unreachable."""
        self._public_n += 1
        n = self._public_n
        ns = self._ns(name)
        dead_ip = None
        if dead_first:
            # An interface that comes first (lower ifindex) whose address nobody can reach.
            dead_ip = f"{DEAD_NET}.{n}.2"
            self._veth(ns, "dead0", self.inet, f"d{n}")
            self.exec(ns, "ip", "addr", "add", f"{dead_ip}/24", "dev", "dead0")
        ip = f"{PUBLIC_NET}.{n}"
        self._attach(ns, f"p{n}", ip)
        self.exec(ns, "ip", "route", "add", "default", "via", f"{PUBLIC_NET}.1")
        host = Host(name, ns, ip, dead_ip)
        self.hosts[name] = host
        return host

    def home(self, name: str, *, drops: bool = False, random_ports: bool = False) -> Host:
        """A host behind its own masquerading NAT router (no port forwards); ``drops``: the
        router drops unsolicited packets instead of refusing them; ``random_ports``: each
        connection gets a random public port (symmetric NAT)."""
        self._homes_n += 1
        i = self._homes_n
        lan = f"192.168.{60 + i}"
        router = self._ns(f"r{i}")
        ns = self._ns(name)
        self._attach(router, f"r{i}", f"{PUBLIC_NET}.{100 + i}")
        # The router's WAN side is eth0 (from _attach); its LAN side faces the home.
        self._veth(router, "lan", ns, "eth0")
        self.exec(router, "ip", "addr", "add", f"{lan}.1/24", "dev", "lan")
        self.exec(router, "ip", "route", "add", "default", "via", f"{PUBLIC_NET}.1")
        self.exec(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        ipt = ["iptables", "-w", "5"]
        rand = ["--random-fully"] if random_ports else []
        self.exec(router, *ipt, "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE",
                  *rand)  # fmt: skip
        self.exec(router, *ipt, "-A", "FORWARD", "-i", "eth0", "-m", "conntrack", "--ctstate",
                  "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip
        self.exec(router, *ipt, "-A", "FORWARD", "-i", "eth0", "-j", "DROP")
        if drops:
            self.exec(router, *ipt, "-A", "INPUT", "-i", "eth0", "-m", "conntrack", "--ctstate",
                      "NEW", "-j", "DROP")  # fmt: skip
        self.exec(ns, "ip", "addr", "add", f"{lan}.2/24", "dev", "eth0")
        self.exec(ns, "ip", "route", "add", "default", "via", f"{lan}.1")
        host = Host(name, ns, f"{lan}.2", wan=f"{PUBLIC_NET}.{100 + i}")
        self.hosts[name] = host
        return host

    def close(self) -> None:
        """Kill what still runs in our namespaces, then delete them (never raises)."""
        for ns in self.namespaces:
            pids = _sh(["ip", "netns", "pids", ns], check=False).split()
            for pid in pids:
                with suppress(ValueError, ProcessLookupError, PermissionError):
                    os.kill(int(pid), signal.SIGKILL)
        for ns in reversed(self.namespaces):
            _sh(["ip", "netns", "del", ns], check=False)
        self.namespaces.clear()


@contextmanager
def lab() -> Iterator[Lab]:
    """A built lab (public router only); add hosts with ``public()``/``home()``."""
    built = Lab()
    try:
        built.build()
        yield built
    finally:
        built.close()
