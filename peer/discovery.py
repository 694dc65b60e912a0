"""Capability ads in the Kademlia DHT, model providers, and how ads are listed.

Publishing: the ad is stored under ``/edgeswarm-ad/<peer id>`` with
``put_value`` (which stores it locally and at the closest peers), and is
re-published at half its TTL, whenever we join a bootstrap node, and when the
load or the served models change. Its ``seq`` is derived from the clock
(milliseconds, strictly increasing), so a restarted peer outranks the ad it
published in its previous life without persisting a counter.

Validation: every node runs ``AdValidator`` for the ``edgeswarm-ad``
namespace, so forged, oversize, expired or garbage records are refused on
PUT (never stored) and ignored on GET; ``select`` keeps the higher seq. The
DHT keeps a stored record 24 h whatever its content says, so the maintenance
loop also drops expired ads from the local store.

Looking up one ad: py-libp2p's ``get_value`` answers from the local store
when it holds *any* copy and then never asks the network again (and it caches
every answer it fetched), so a listing would pin stale load figures. We ask
the peers instead: the owner itself (freshest copy) plus the closest peers to
the key, validate every answer and keep the best (``better_record``).

Listing all ads: a DHT cannot enumerate its keys, so ``find_ads`` looks up
the ad key of every peer we know of: the routing table, the connected peers,
the peerstore (peers learned from FIND_NODE answers), the owners of ads
stored at us, and peers found by a crawl. The crawl (``crawl``) first runs a
self-lookup, then iterative lookups of random keys, 4 at a time, until two
rounds in a row find no new peer: each walk returns the ~20 peers closest to
its key, so N peers cost about N/20 walks. For each candidate we then ask its
owner and the 3 locally-closest peers to its key in one round. Listing is
O(N) by nature (every ad is fetched); the market should use
``find_providers(cid)``, which is one DHT lookup. A peer that is gone stops
answering and its stored copies expire, so it drops out of the listing
within one ad TTL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import nacl.signing
import trio
from libp2p.abc import IHost
from libp2p.kad_dht.kad_dht import KadDHT, _encode_key
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.validator import Validator

from protocols.ad import (
    AD_KEY_PREFIX,
    AD_MAX_SIZE,
    MAX_ADDRS,
    CapabilityAd,
    Device,
    ModelOffer,
    ad_key,
    better_record,
    build_ad,
    parse_ad_record,
    peer_id_from_ad_key,
    select_best,
)
from protocols.errors import LocalProtocolError, ProtocolError
from protocols.identity import public_key_from_peer_id

log = logging.getLogger(__name__)

ModelEntry = tuple[str, str, float]
"""(cid, name, p50_ms) of a model this peer serves."""
ModelsSource = Iterable[ModelEntry] | Callable[[], Iterable[ModelEntry]] | None

MAX_ADDR_TEXT = 256  # longer addresses are left out of our ad
QUERY_TIMEOUT = 3.0  # one GET_VALUE at one peer
WALK_TIMEOUT = 10.0  # one iterative lookup
PUBLISH_TIMEOUT = 30.0
MIN_PUBLISH_INTERVAL = 1.0  # debounce load updates
PURGE_INTERVAL = 30.0  # drop expired ads from our store at least this often
LIST_CONCURRENCY = 16
LIST_CLOSEST = 3
CRAWL_ROUNDS = 16
CRAWL_PARALLEL = 4
CRAWL_MIN_INTERVAL = 10.0  # seconds between two crawls by find_ads
AD_CACHE_S = 30.0  # a cached ad of a provider is re-fetched after this long
AD_CACHE_MAX = 4096  # cached ads (least recently used dropped first)
AD_FETCH_BUDGET = 2.0  # one round of ad GETs for a provider lookup

_SHA256_HEX = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")


class AdRejected(ValueError):
    """The DHT validator refused a record; py-libp2p treats any exception as 'reject'."""


class AdValidator(Validator):
    """py-libp2p validator for the ``edgeswarm-ad`` namespace (wraps protocols.ad)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock

    def validate(self, key: str, value: bytes) -> None:
        try:
            parse_ad_record(key, value, self._clock())
        except ProtocolError as exc:
            log.debug("rejected ad record under %s: %s", key[:80], exc)
            raise AdRejected(f"{key[:80]}: {exc}") from None

    def select(self, key: str, values: list[bytes]) -> int:
        return select_best(key, values, self._clock())


def provider_key(cid: str) -> str:
    """DHT provider key for a model cid.

    A sha256 hex cid (optionally ``sha256:``-prefixed) becomes its multihash
    (``1220`` + digest) in hex, the same key an IPFS node would use for that
    digest; anything else is passed to py-libp2p as is (e.g. a CID string).
    """
    m = _SHA256_HEX.match(cid.lower())
    return "1220" + m.group(1) if m else cid


@dataclass(frozen=True)
class Provider:
    """A peer that announced it serves a cid, with the addresses it gave.

    From ``find_executors``: ``ad`` is its valid capability ad and ``addrs``
    are the ad's (bound to the peer id by the ad's own rules).
    """

    peer_id: str
    addrs: tuple[str, ...]
    ad: CapabilityAd | None = None


@dataclass
class AdCache:
    """Capability ads of peers we looked up, re-fetched after ``max_age`` seconds.

    Entries go when their ad expires, when a refresh finds no valid ad (the peer
    left and its copies expired), and least recently used first beyond ``max_size``.
    """

    max_age: float = AD_CACHE_S
    max_size: int = AD_CACHE_MAX
    entries: dict[str, tuple[CapabilityAd, float]] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    def get(self, peer_id: str, now_mono: float, now: float) -> CapabilityAd | None:
        held = self.entries.pop(peer_id, None)
        if held is None:
            return None
        ad, at = held
        if ad.expires_at <= now:
            return None
        self.entries[peer_id] = held  # most recently used last
        return ad if now_mono - at < self.max_age else None

    def put(self, ad: CapabilityAd, now_mono: float) -> None:
        held = self.entries.pop(ad.peer_id, None)
        if held is not None:
            ad = better_record(ad, held[0])
        self.entries[ad.peer_id] = (ad, now_mono)
        while len(self.entries) > self.max_size:
            del self.entries[next(iter(self.entries))]

    def forget(self, peer_id: str) -> None:
        self.entries.pop(peer_id, None)


def _models_now(
    source: ModelsSource, ipfs_of: Callable[[str], str] | None = None
) -> tuple[ModelOffer, ...]:
    if source is None:
        return ()
    entries = source() if callable(source) else source
    out: dict[str, ModelOffer] = {}
    for cid, name, p50 in entries:
        ipfs = ipfs_of(cid) if ipfs_of is not None else ""
        out.setdefault(cid, ModelOffer(cid=cid, name=name, p50_ms=float(p50), ipfs=ipfs))
    return tuple(out.values())


def _is_edgeswarm_peer(peer_id: str) -> bool:
    try:
        public_key_from_peer_id(peer_id)
    except ProtocolError:
        return False
    return True


@dataclass
class AdState:
    """What goes into our next ad (mutable inputs; the ad itself is immutable)."""

    addrs: tuple[str, ...]
    devices: tuple[Device, ...]
    providers: tuple[str, ...]
    price: float
    models: ModelsSource = None
    load: float = 0.0
    queue: int = 0
    provided: set[str] = field(default_factory=set)
    # cid -> the IPFS CIDv1 of the model's bytes ("" if unknown), for the ad.
    ipfs_of: Callable[[str], str] | None = None


class Discovery:
    """Publishes our ad, provides our models, finds others' ads and providers."""

    def __init__(
        self,
        host: IHost,
        dht: KadDHT,
        key: nacl.signing.SigningKey,
        state: AdState | None,
        *,
        ttl: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.dht = dht
        self._key = key
        self._state = state
        self._ttl = ttl
        self._clock = clock
        self._seq = 0
        self._wake = trio.Event()
        self._running = False
        self._crawled: set[str] = set()  # peer ids learned by crawl()
        self._last_crawl = -math.inf
        self.crawls = 0
        self.ad_cache = AdCache()
        self.listed_ads = AdCache()  # what find_ads found (its answer when a GET times out)
        self.current_ad: CapabilityAd | None = None
        self.peer_id = str(host.get_id())
        # Our advertised addresses, read at every publish (peer.reach: announce, AutoNAT-
        # confirmed, usable listen addresses, relay circuits); None: keep AdState.addrs.
        self.addrs_source: Callable[[], Iterable[str]] | None = None
        # "public" / "private" (AutoNAT) or "" for the ad's reachability; None: leave it out.
        self.reachability_source: Callable[[], str] | None = None

    # -- publishing -------------------------------------------------------

    @property
    def publishes(self) -> bool:
        return self._state is not None

    def request_publish(self) -> None:
        """Publish again soon (after a join, a load change, new models)."""
        if self._running:  # before that, the first publish in run() covers it
            self._wake.set()

    def set_load(self, load: float, queue: int) -> None:
        if self._state is not None:
            self._state.load, self._state.queue = float(load), int(queue)
            self.request_publish()

    def _next_ad(self) -> CapabilityAd:
        assert self._state is not None
        now = self._clock()
        self._seq = max(self._seq + 1, int(now * 1000))
        s = self._state
        if self.addrs_source is not None:
            s.addrs = tuple(a for a in self.addrs_source() if len(a) <= MAX_ADDR_TEXT)[:MAX_ADDRS]
        return CapabilityAd(
            peer_id=self.peer_id,
            addrs=s.addrs,
            devices=s.devices,
            providers=s.providers,
            models=_models_now(s.models, s.ipfs_of),
            price=s.price,
            load=s.load,
            queue=s.queue,
            seq=self._seq,
            expires_at=now + self._ttl,
            reachability=self.reachability_source() if self.reachability_source else "",
        )

    def _signed_ad(self) -> tuple[CapabilityAd, bytes] | None:
        """Our next ad and its record; models that do not fit the size cap are left out."""
        try:
            ad = self._next_ad()
        except Exception as exc:  # a models source is caller code: never let it end the peer
            log.error("cannot build the capability ad, keeping the previous one: %s", exc)
            return None
        while True:
            try:
                return ad, build_ad(self._key, ad)
            except LocalProtocolError as exc:
                if not ad.models:
                    log.error("cannot sign the capability ad: %s", exc)
                    return None
                ad = dataclasses.replace(ad, models=ad.models[:-1])
                log.warning("ad too large; advertising only the first %d models", len(ad.models))

    def _prepare(self) -> tuple[CapabilityAd, bytes] | None:
        """Sign our next ad and make it ``current_ad`` (None when we publish nothing)."""
        if self._state is None:
            return None
        signed = self._signed_ad()
        if signed is not None:
            self.current_ad = signed[0]
        return signed

    async def publish_once(self) -> None:
        """Sign a fresh ad, store it in the DHT, and provide any cid not yet provided."""
        signed = self._prepare()
        if signed is not None:
            await self._push(*signed)

    async def _push(self, ad: CapabilityAd, value: bytes) -> None:
        assert self._state is not None
        with trio.move_on_after(PUBLISH_TIMEOUT) as scope:
            try:
                await self.dht.put_value(ad_key(self.peer_id), value)
            except (ValueError, OSError, trio.BrokenResourceError) as exc:
                log.warning("could not publish capability ad (seq %d): %s", ad.seq, exc)
        if scope.cancelled_caught:
            log.warning("publishing the capability ad took over %.0f s", PUBLISH_TIMEOUT)
        log.debug("published ad seq %d with %d models", ad.seq, len(ad.models))
        for model in ad.models:
            if model.cid not in self._state.provided:
                with trio.move_on_after(PUBLISH_TIMEOUT):
                    try:
                        await self.dht.provide(provider_key(model.cid))
                        self._state.provided.add(model.cid)
                    except (ValueError, OSError) as exc:
                        log.warning("could not provide model %s: %s", model.cid, exc)

    def reprovide_all(self) -> None:
        """Forget which cids were provided, so the next publish announces them all again."""
        if self._state is not None:
            self._state.provided.clear()
            self.request_publish()

    def purge_expired(self) -> int:
        """Drop ads from our DHT store that are expired or invalid (py-libp2p keeps them 24 h)."""
        store = self.dht.value_store
        prefix = AD_KEY_PREFIX.encode()
        now = self._clock()
        dropped = 0
        for kb in [k for k in list(store.store) if k.startswith(prefix)]:
            record = store.store[kb][0]
            try:
                parse_ad_record(kb.decode(), record.value, now)
            except (ProtocolError, UnicodeDecodeError):
                store.remove(kb)
                dropped += 1
        return dropped

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Publish now, then keep the ad fresh.

        Reports started once the first ad is signed, before it reaches the
        network: a slow or absent network must not hold up the peer's start.
        """
        self._running = True
        signed = self._prepare()
        task_status.started()
        if signed is not None:
            await self._push(*signed)
        last = self._clock()
        while True:
            wait = PURGE_INTERVAL
            if self.publishes:  # re-publish at half-life
                wait = min(wait, max(0.0, last + self._ttl / 2 - self._clock()))
            requested = False
            with trio.move_on_after(wait):
                await self._wake.wait()
                requested = True
            if requested:
                # A rate limit, not a settle-down sleep: load updates can come fast.
                since = self._clock() - last
                if since < MIN_PUBLISH_INTERVAL:
                    await trio.sleep(MIN_PUBLISH_INTERVAL - since)
                self._wake = trio.Event()
            self.purge_expired()
            if self.publishes and (requested or self._clock() >= last + self._ttl / 2):
                await self.publish_once()
                last = self._clock()

    # -- finding ----------------------------------------------------------

    async def _ask(self, peer: ID, key: str) -> CapabilityAd | None:
        kb = key.encode()
        with trio.move_on_after(QUERY_TIMEOUT):
            try:
                rec = await self.dht.value_store._get_from_peer(peer, kb, return_record=True)
            except Exception as exc:  # py-libp2p raises many types on a dead peer
                log.debug("GET %s from %s failed: %s", key, peer, exc)
                return None
            value = getattr(rec, "value", None)
            if not value or len(value) > AD_MAX_SIZE:
                return None
            try:
                return parse_ad_record(key, value, self._clock())
            except ProtocolError as exc:
                log.info("peer %s answered with an invalid ad for %s: %s", peer, key, exc)
        return None

    def _local(self, key: str) -> CapabilityAd | None:
        rec = self.dht.value_store.get(key.encode())
        if rec is None:
            return None
        try:
            return parse_ad_record(key, rec.value, self._clock())
        except ProtocolError:
            return None

    async def find_ad(self, peer_id: str, *, walk: bool = True) -> CapabilityAd | None:
        """The best valid ad of ``peer_id`` we can find now, or None.

        ``walk=True`` runs an iterative DHT lookup for the key's closest peers;
        ``walk=False`` asks only the owner and the closest peers we know.
        """
        key = ad_key(peer_id)
        mine = self.current_ad if peer_id == self.peer_id else None
        if mine is not None and mine.expires_at > self._clock():
            return mine
        found: list[CapabilityAd] = []
        local = self._local(key)
        if local is not None:
            found.append(local)
        kb = key.encode()
        targets: list[ID] = []
        owner = ID.from_base58(peer_id)
        if owner != self.host.get_id():
            targets.append(owner)
        if walk:
            with trio.move_on_after(WALK_TIMEOUT):
                closest = await self.dht.peer_routing.find_closest_peers_network(kb)
                targets += [p for p in closest if p not in targets]
        else:
            closest = self.dht.routing_table.find_local_closest_peers(kb, LIST_CLOSEST)
            targets += [p for p in closest if p not in targets]
        targets = [p for p in targets if p != self.host.get_id()]

        async def ask(p: ID) -> None:
            ad = await self._ask(p, key)
            if ad is not None:
                found.append(ad)

        async with trio.open_nursery() as nursery:
            for p in targets:
                nursery.start_soon(ask, p)
        best: CapabilityAd | None = None
        for ad in found:
            best = ad if best is None else better_record(ad, best)
        return best

    def known_peer_ids(self) -> set[str]:
        """Every peer id we could look an ad up for (see the module docstring)."""
        ids: set[str] = {str(p) for p in self.dht.routing_table.get_peer_ids()}
        ids |= {str(p) for p in self.host.get_connected_peers()}
        ids |= self._crawled
        with contextlib.suppress(Exception):  # the other sources suffice
            ids |= {str(p) for p in self.host.get_peerstore().peers_with_addrs()}
        prefix = AD_KEY_PREFIX.encode()
        for kb in list(self.dht.value_store.store):
            if kb.startswith(prefix):
                with contextlib.suppress(ProtocolError, UnicodeDecodeError):
                    ids.add(peer_id_from_ad_key(kb.decode()))
        if self.publishes:
            ids.add(self.peer_id)
        return {i for i in ids if _is_edgeswarm_peer(i)}

    async def self_lookup(self) -> int:
        """Kademlia's join step: look up our own id and keep what answers in the routing table.

        (py-libp2p's ``refresh_routing_table`` also walks one random key per
        bucket, but 0.8.1 builds keys its own servers reject; the self-lookup
        is the part that finds our neighbourhood.) Returns the table size.
        """
        with trio.move_on_after(WALK_TIMEOUT):
            try:
                me = self.host.get_id()
                closest = await self.dht.peer_routing.find_closest_peers_network(me.to_bytes())
                store = self.host.get_peerstore()
                for pid in closest:
                    addrs = store.addrs(pid) if pid != me else []
                    if addrs:
                        await self.dht.routing_table.add_peer(PeerInfo(pid, addrs))
            except Exception as exc:  # a failed lookup must not end the caller
                log.debug("self-lookup failed: %s", exc)
        return int(self.dht.get_routing_table_size())

    async def crawl(self, *, rounds: int = CRAWL_ROUNDS, parallel: int = CRAWL_PARALLEL) -> int:
        """Learn peers beyond our neighbourhood: iterative lookups of random keys.

        Each walk returns the ~20 peers closest to its key, so a network of N
        peers needs about N/20 walks; we stop after two rounds that found no
        new peer (or ``rounds`` rounds). Returns how many peers we know.
        """

        async def walk(key: bytes) -> None:
            with trio.move_on_after(WALK_TIMEOUT):
                try:
                    found = await self.dht.peer_routing.find_closest_peers_network(key)
                except Exception as exc:
                    log.debug("crawl walk failed: %s", exc)
                    return
                self._crawled |= {str(p) for p in found}

        quiet = 0
        for _ in range(rounds):
            before = len(self.known_peer_ids())
            async with trio.open_nursery() as nursery:
                for _ in range(parallel):
                    nursery.start_soon(walk, secrets.token_bytes(32))
            quiet = quiet + 1 if len(self.known_peer_ids()) == before else 0
            if quiet >= 2:
                break
        return len(self.known_peer_ids())

    async def find_ads(self, *, refresh: bool = True) -> list[CapabilityAd]:
        """Valid ads of every peer we know of (ours included), sorted by peer id.

        ``refresh``: first run the self-lookup and a crawl (see ``crawl``) so
        peers outside our neighbourhood are known too; skipped when the last
        one is under ``CRAWL_MIN_INTERVAL`` old, so callers may poll cheaply.
        A peer whose ad lookup finds nothing gets the ad an earlier listing
        found (``listed_ads``) when that was under ``AD_CACHE_S`` ago and it has
        not expired (on a busy box a GET can time out right after the same ad
        was listed).
        """
        if refresh and trio.current_time() - self._last_crawl >= CRAWL_MIN_INTERVAL:
            await self.self_lookup()
            await self.crawl()
            self._last_crawl = trio.current_time()
            self.crawls += 1
        ids = sorted(self.known_peer_ids())
        results: dict[str, CapabilityAd] = {}
        limiter = trio.CapacityLimiter(LIST_CONCURRENCY)

        async def one(pid: str) -> None:
            async with limiter:
                ad = await self.find_ad(pid, walk=False)
            now_mono = trio.current_time()
            if ad is not None:
                self.listed_ads.put(ad, now_mono)
            else:  # no answer in time (a busy box): its ad listed under AD_CACHE_S ago
                ad = self.listed_ads.get(pid, now_mono, self._clock())
            if ad is not None:
                results[pid] = ad

        async with trio.open_nursery() as nursery:
            for pid in ids:
                nursery.start_soon(one, pid)
        return [results[p] for p in sorted(results)]

    async def find_providers(self, cid: str, *, count: int = 20) -> list[Provider]:
        """Peers that provide ``cid``, each once (py-libp2p can repeat a provider).

        Asks the network every time: py-libp2p's own ``find_providers`` answers
        from the local store as soon as it holds any record for the key, and it
        stores every answer it fetched, so after one lookup a provider that
        appeared later would never be seen. We walk to the closest peers of the
        key and ask each of them (one round, in parallel), plus our own store.
        """
        key = _encode_key(provider_key(cid))
        store = self.dht.provider_store
        infos: list[PeerInfo] = list(store.get_providers(key))
        me = self.host.get_id()

        async def ask(peer: ID) -> None:
            with trio.move_on_after(QUERY_TIMEOUT):
                try:
                    found, _closer = await store._get_providers_from_peer_with_closers(peer, key)
                except Exception as exc:  # py-libp2p raises many types on a dead peer
                    log.debug("GET_PROVIDERS at %s failed: %s", peer, exc)
                    return
                infos.extend(found)

        with trio.move_on_after(WALK_TIMEOUT):
            closest = await self.dht.peer_routing.find_closest_peers_network(key)
            async with trio.open_nursery() as nursery:
                for peer in closest:
                    if peer != me:
                        nursery.start_soon(ask, peer)
        seen: dict[str, Provider] = {}
        for info in infos:
            pid = str(info.peer_id)
            addrs = tuple(str(a) for a in info.addrs)
            held = seen.get(pid)
            if held is None or (addrs and not held.addrs):
                seen[pid] = Provider(pid, addrs)
        return list(seen.values())[:count]

    async def find_executors(self, cid: str, *, count: int = 20) -> list[Provider]:
        """Providers of ``cid`` (DHT provider records: one lookup, no crawl) with their ads.

        Only those providers' ads are fetched, through ``ad_cache``: a cached ad
        younger than ``AD_CACHE_S`` is used as is, the others are re-fetched (the
        owner and the closest peers to its key, in parallel, within
        ``AD_FETCH_BUDGET``), so load, price and addresses follow the network as it
        changes. A provider whose ad lists the cid comes back with the ad's
        addresses; one whose ad was not found keeps its provider-record addresses;
        one whose ad does not list the cid (it stopped serving it) is left out.
        """
        providers = await self.find_providers(cid, count=count)
        now_mono, now = trio.current_time(), self._clock()
        ads: dict[str, CapabilityAd] = {}
        stale: list[str] = []
        for p in providers:
            ad = self.ad_cache.get(p.peer_id, now_mono, now)
            if ad is None:
                stale.append(p.peer_id)
                self.ad_cache.misses += 1
            else:
                ads[p.peer_id] = ad
                self.ad_cache.hits += 1
        limiter = trio.CapacityLimiter(LIST_CONCURRENCY)

        async def fetch(pid: str) -> None:
            async with limiter:
                ad = await self.find_ad(pid, walk=False)
            if ad is None:
                self.ad_cache.forget(pid)
            else:
                self.ad_cache.put(ad, trio.current_time())
                ads[pid] = ad

        with trio.move_on_after(AD_FETCH_BUDGET):
            async with trio.open_nursery() as nursery:
                for pid in stale:
                    nursery.start_soon(fetch, pid)
        out: list[Provider] = []
        for p in providers:
            ad = ads.get(p.peer_id)
            if ad is None:
                out.append(p)
            elif any(provider_key(m.cid) == provider_key(cid) for m in ad.models):
                out.append(Provider(p.peer_id, ad.addrs or p.addrs, ad))
        return out
