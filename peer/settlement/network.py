"""Which settlement network a peer is in: its genesis, and where its ledger lives.

A network is named by its genesis (``protocols.genesis``), never by bootstrap
addresses. A data dir keeps one ledger per network, in
``<data dir>/networks/<network id>/`` (with that network's ``genesis.json``);
``<data dir>/networks/current`` names the last one used, for ``edgeswarm ledger``.

``resolve_genesis`` picks the genesis, first match wins:

1. ``genesis`` (setting): a genesis file (JSON, as ``genesis.json`` is written);
2. ``ledger_witnesses`` set: the genesis those settings describe (every peer given
   the same settings derives the same genesis: the demo and tests do this);
3. a bootstrap node that founded a network (``<data dir>/genesis.json``) keeps it;
   one with no other bootstrap node to ask founds one, with itself as witness;
4. otherwise it is asked of the bootstrap nodes, then of any connected peer, over
   ``/edgeswarm/genesis/1`` (every peer that runs settlement answers): so any
   running peer's address works as ``--bootstrap``.

``network`` (setting), when set, pins the network id (or a prefix of 8+ hex digits):
any other genesis is refused with one clear line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from peer.config import Config
from peer.settlement_paths import (
    GENESIS_FILE,
    NetworkError,
    NoNetwork,
    read_genesis_file,
    write_genesis_file,
)
from protocols.codec import FrameDecoder, frame
from protocols.errors import ProtocolError
from protocols.genesis import (
    GENESIS_REPLY_MAX,
    GENESIS_REQUEST_MAX,
    MICRO,
    Genesis,
    check_genesis_request,
    genesis_reply,
    genesis_request,
    parse_genesis_reply,
)

log = logging.getLogger(__name__)

GENESIS_PROTOCOL = TProtocol("/edgeswarm/genesis/1")
FETCH_TIMEOUT = 5.0  # one ask of one peer
FETCH_WAIT = 15.0  # all asks together, while the bootstrap links come up
MIN_PIN = 8


def check_pin(config: Config, genesis: Genesis, source: str) -> None:
    pin = config.network.strip().lower()
    if not pin:
        return
    if len(pin) < MIN_PIN or any(c not in "0123456789abcdef" for c in pin):
        raise NetworkError(
            f"network must be a network id (at least {MIN_PIN} hex digits), got {config.network!r}"
        )
    if not genesis.network_id.startswith(pin):
        raise NetworkError(
            f"this peer must join network {pin[:16]}, but {source} is network "
            f"{genesis.network_id[:16]} ({genesis.name!r}); "
            "check --bootstrap or the network setting"
        )


def genesis_params(config: Config) -> dict[str, Any]:
    """The genesis parameters the settings give (what a founder writes)."""
    return {
        "f": config.ledger_f,
        "pow_bits": config.ledger_pow_bits,
        "base_limit": round(config.ledger_base_limit * MICRO),
        "epoch_ms": max(100, round(config.ledger_epoch * 1000)),
        "eligible_age": config.ledger_eligible_age,
        "eligible_earned": round(config.ledger_eligible_earned * MICRO),
    }


def genesis_from_settings(config: Config, witnesses: tuple[str, ...]) -> Genesis:
    """The genesis that these settings describe: equal settings give an equal genesis."""
    seed = hashlib.sha256(b"edgeswarm/beacon-seed/v1\x00" + config.ledger_beacon.encode()).digest()
    try:
        return Genesis.create(config.network_name, seed, witnesses, **genesis_params(config))
    except ProtocolError as exc:
        raise NetworkError(f"the settlement settings do not make a valid genesis: {exc}") from None


def found_genesis(config: Config, founder: str) -> Genesis:
    """A new network founded by ``founder`` (a bootstrap node): fresh beacon seed."""
    try:
        return Genesis.create(
            config.network_name, secrets.token_bytes(32), (founder,), **genesis_params(config)
        )
    except ProtocolError as exc:
        raise NetworkError(f"the settlement settings do not make a valid genesis: {exc}") from None


# --- /edgeswarm/genesis/1 ------------------------------------------------------------------


def serve_genesis(host: IHost, genesis: Genesis) -> None:
    """Answer ``/edgeswarm/genesis/1`` with ``genesis`` (until the handler is removed)."""
    reply = frame(genesis_reply(genesis), max_size=GENESIS_REPLY_MAX)

    async def handler(stream: INetStream) -> None:
        try:
            with trio.move_on_after(FETCH_TIMEOUT):
                decoder = FrameDecoder(max_size=GENESIS_REQUEST_MAX)
                for _ in range(GENESIS_REQUEST_MAX):  # bounded: a byte at least per read
                    data = decoder.next_frame()
                    if data is not None:
                        check_genesis_request(data)
                        await stream.write(reply)
                        break
                    chunk = await stream.read(GENESIS_REQUEST_MAX)
                    if not chunk:
                        break
                    decoder.feed(chunk)
        except Exception as exc:  # a bad or vanished asker
            log.debug("genesis request failed: %r", exc)
        finally:
            with trio.move_on_after(1):
                try:
                    await stream.close()
                except Exception:
                    log.debug("closing a genesis stream failed", exc_info=True)

    host.set_stream_handler(GENESIS_PROTOCOL, handler)


async def fetch_genesis(host: IHost, peer_id: str) -> Genesis:
    """Ask one peer for its network's genesis (raises NetworkError)."""
    try:
        with trio.fail_after(FETCH_TIMEOUT):
            stream = await host.new_stream(ID.from_base58(peer_id), [GENESIS_PROTOCOL])
            try:
                await stream.write(frame(genesis_request(), max_size=GENESIS_REQUEST_MAX))
                decoder = FrameDecoder(max_size=GENESIS_REPLY_MAX)
                for _ in range(GENESIS_REPLY_MAX):  # bounded: a byte at least per read
                    data = decoder.next_frame()
                    if data is not None:
                        return parse_genesis_reply(data)
                    chunk = await stream.read(65536)
                    if not chunk:
                        break
                    decoder.feed(chunk)
            finally:
                with trio.move_on_after(1):
                    await stream.close()
    except trio.TooSlowError:
        raise NetworkError(f"{peer_id} did not send its genesis in {FETCH_TIMEOUT:.0f} s") from None
    except ProtocolError as exc:
        raise NetworkError(f"{peer_id} sent a bad genesis: {exc}") from None
    except NetworkError:
        raise
    except Exception as exc:
        raise NetworkError(f"cannot ask {peer_id} for its genesis: {exc!r}") from None
    raise NetworkError(f"{peer_id} closed the stream without a genesis")


def _bootstrap_ids(config: Config, me: str) -> list[str]:
    out = []
    for address in config.bootstrap:
        part = address.rsplit("/p2p/", 1)
        if len(part) == 2 and part[1] and part[1] != me and part[1] not in out:
            out.append(part[1])
    return out


def local_genesis(config: Config, *, role: str, me: str) -> tuple[Genesis, str] | None:
    """Steps 1-3: the genesis this peer knows without asking anyone (None: ask)."""
    if config.genesis:
        path = Path(os.path.expanduser(config.genesis))
        return read_genesis_file(path), f"the genesis file {path}"
    if config.ledger_witnesses:
        genesis = genesis_from_settings(config, tuple(config.ledger_witnesses))
        return genesis, "the ledger_witnesses setting"
    if role != "bootstrap":
        return None
    founded = Path(config.data_dir) / GENESIS_FILE
    if founded.exists():
        return read_genesis_file(founded), f"the network this node founded ({founded})"
    if _bootstrap_ids(config, me):
        return None  # a bootstrap node of an existing network: ask it
    genesis = found_genesis(config, me)
    write_genesis_file(founded, genesis)
    log.info("founded settlement network %s (%s)", genesis.network_id[:16], genesis.name)
    return genesis, "a new network founded by this node"


async def resolve_genesis(host: IHost, config: Config, *, role: str) -> tuple[Genesis, str]:
    """This peer's network genesis and where it came from (see the module docstring)."""
    me = str(host.get_id())
    found = await trio.to_thread.run_sync(lambda: local_genesis(config, role=role, me=me))
    if found is None:
        found = await _ask_network(host, config, _bootstrap_ids(config, me))
    check_pin(config, *found)
    return found


async def _ask_network(host: IHost, config: Config, bootstrap: list[str]) -> tuple[Genesis, str]:
    if not bootstrap and not host.get_connected_peers():
        raise NoNetwork(
            "no network to join: give --bootstrap MULTIADDR (any running peer's address works), "
            "a genesis file (EDGESWARM_GENESIS) or ledger_witnesses"
        )
    errors: list[str] = []
    with trio.move_on_after(FETCH_WAIT):
        for attempt in range(8):  # bounded by FETCH_WAIT too; links may still be coming up
            connected = [str(p) for p in host.get_connected_peers()]
            candidates = [p for p in bootstrap if p in connected]
            candidates += [p for p in connected if p not in candidates]
            for peer_id in candidates:
                try:
                    return await fetch_genesis(host, peer_id), f"peer {peer_id}"
                except NetworkError as exc:
                    errors.append(str(exc))
            await trio.sleep(min(0.25 * 2**attempt, 4.0))
    why = errors[-1] if errors else "no bootstrap node or other peer is reachable"
    raise NoNetwork(f"cannot learn the network's genesis: {why}")
