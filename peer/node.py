"""``open_peer``: one edgeswarm peer with all its network services, started and stopped together.

::

    async with open_peer(config, models=[(cid, "mobilenet", 12.5)]) as peer:
        print(peer.peer_id, peer.listen_addrs)
        for ad in await peer.find_ads():
            ...

Roles:

* ``"peer"`` (default): DHT server, publishes a capability ad, provides the
  cids of its models, joins gossipsub.
* ``"bootstrap"``: DHT server and gossip relay with no ad and no models.
* ``"client"``: DHT client (answers no DHT queries, stores nothing for
  others) that only looks things up, e.g. ``edgeswarm peers``.

Every service runs in a nursery owned by this context manager; on exit all of
them stop and the host closes, nothing is left running. Bootstrap nodes that
cannot be reached are retried with exponential backoff (0.5 s .. 30 s) for as
long as the peer runs; whenever a link comes up (again) the peer refreshes
its routing table and re-publishes its ad.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

import nacl.signing
import trio
from libp2p.abc import IHost, INetConn
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import (
    PROTOCOL_ID,
    PROTOCOL_ID_V11,
    PROTOCOL_ID_V12,
    GossipSub,
)
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from peer.caps import PubsubIntake, StreamCaps, caps_for, intake_for
from peer.config import Config, ConfigError
from peer.dirlock import exclusive_lock
from peer.discovery import (
    AdState,
    AdValidator,
    Discovery,
    ModelsSource,
    Provider,
)
from peer.host import (
    DIAL_TIMEOUT,
    build_host,
    connect,
    peer_info_from_addr,
    running_host,
)
from peer.identity import IdentityError, load_or_create_identity
from peer.logging_setup import (
    install_libp2p_filter,
    log_exception_leaves,
    reraise_lone_error,
    without_teardown_races,
)
from peer.reach import reach_of
from peer.reach.notifee import QuietNotifee
from protocols.ad import AD_MAX_TTL, AD_NAMESPACE, MAX_ADDRS, CapabilityAd, Device

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from edge_models.spec import ModelEntry
    from peer.http import HttpServer
    from peer.market import InferResult, Lease, MarketService, ReceiptBook
    from peer.model_transfer import ModelTransfer, Progress
    from peer.settlement import SettlementService

log = logging.getLogger(__name__)

Role = Literal["peer", "bootstrap", "client"]
PEER_LOCK = "peer.lock"


class DataDirInUse(IdentityError):
    """Another running peer owns this data dir (and so this identity)."""


def _dir_in_use(config: Config) -> Any:
    def error(holder: str) -> DataDirInUse:
        return DataDirInUse(
            f"the data dir {config.data_dir} is in use by another edgeswarm peer (pid {holder}); "
            "run one peer per data dir, or give this one its own --data-dir"
        )

    return error


ROLES: tuple[Role, ...] = ("peer", "bootstrap", "client")

BACKOFF_START = 0.5
MIN_AD_TTL = 1.0
BACKOFF_MAX = 30.0
GOSSIP_HEARTBEAT = 1  # seconds; py-libp2p's default of 120 s makes meshes slow to form


@functools.cache
def _probe_hardware() -> Any:
    from edge_models.hardware import probe  # onnxruntime import: only for peers with an ad

    return probe()


def _devices_of(hardware: Any) -> tuple[Device, ...]:
    out = []
    for d in hardware.devices():
        mem = d.get("memory")
        out.append(
            Device(
                kind=str(d.get("kind") or "cpu")[:64],
                name=str(d.get("name") or "")[:256],
                memory=int(mem) if isinstance(mem, int) and mem >= 0 else None,
            )
        )
    return tuple(out[:16])


class _LinkWatcher(QuietNotifee):
    """Sets an event when the connection to a watched peer goes away."""

    def __init__(self) -> None:
        self.lost: dict[ID, trio.Event] = {}

    async def disconnected(self, network: Any, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        event = self.lost.get(peer)
        if event is not None and peer not in network.connections:
            event.set()


class BootstrapLink:
    """Keeps us connected to one bootstrap node: dial, back off, re-dial when lost."""

    def __init__(self, peer: Peer, address: str, watcher: _LinkWatcher) -> None:
        self.peer = peer
        self.address = address
        self.info = peer_info_from_addr(address)
        self.watcher = watcher
        self.delay = BACKOFF_START
        self.joined = 0  # how many times the link came up

    async def attempt(self) -> bool:
        host = self.peer.host
        if self.info.peer_id == host.get_id():
            return True  # listed ourselves (a bootstrap node given its own address)
        lost = trio.Event()
        self.watcher.lost[self.info.peer_id] = lost
        # The swarm refuses to re-dial a peer that failed in the last 60 s; our
        # own backoff decides when to retry, so lift that block.
        unblock = getattr(host.get_network(), "unblock_peer", None)
        if unblock is not None:
            unblock(self.info.peer_id)
        try:
            await connect(host, self.address, limit=DIAL_TIMEOUT)
        except (OSError, trio.TooSlowError, Exception) as exc:
            log.warning(
                "bootstrap %s unreachable (%s); retrying in %.1f s",
                self.address,
                str(exc) or type(exc).__name__,
                self.delay,
            )
            return False
        self.delay = BACKOFF_START
        self.joined += 1
        log.info("joined the network through bootstrap %s", self.address)
        self.peer.reach.kick()  # AutoNAT and relay reservations: a server/relay is here
        await self.peer.dht.add_peer(self.info.peer_id, skip_server_mode_check=True)
        await self.peer.discovery.self_lookup()
        if self.joined > 1:
            self.peer.discovery.reprovide_all()
        else:
            self.peer.discovery.request_publish()
        return True

    async def run(self, connected: bool) -> None:
        """Forever: while connected wait for the link to drop; else retry with backoff."""
        while True:
            if connected:
                await self.watcher.lost[self.info.peer_id].wait()
                log.warning("lost bootstrap %s; reconnecting", self.address)
            else:
                await trio.sleep(self.delay * random.uniform(0.8, 1.2))
                self.delay = min(self.delay * 2, BACKOFF_MAX)
            connected = await self.attempt()


class Peer:
    """A running edgeswarm peer. Made by ``open_peer``; valid only inside its ``async with``."""

    def __init__(
        self,
        *,
        config: Config,
        role: Role,
        key: nacl.signing.SigningKey,
        host: IHost,
        dht: KadDHT,
        pubsub: Pubsub,
        gossipsub: GossipSub,
        discovery: Discovery,
        listen_addrs: list[str],
    ) -> None:
        self.config = config
        self.role = role
        self.key = key
        self.host = host
        self.dht = dht
        self.pubsub = pubsub
        self.gossipsub = gossipsub
        self.discovery = discovery
        self.listen_addrs = listen_addrs
        self.peer_id = str(host.get_id())
        # Dialing (every address, relays) and what we advertise: see peer.reach.
        self.reach = reach_of(host)
        self.bootstrap_links: list[BootstrapLink] = []
        # The job market (peer role, or on request): set by open_peer.
        self.market: MarketService | None = None
        # Settlement (ledger store + /edgeswarm/ledger/1); None when off or no witnesses.
        self.settlement: SettlementService | None = None
        # Models by cid from other peers (/edgeswarm/model/1); None for bootstrap nodes.
        self.models: ModelTransfer | None = None
        # The HTTP front door (``Config.http``); set by open_peer when it serves one.
        self.http: HttpServer | None = None
        # Set to ask whoever runs this peer (``edgeswarm run``) to stop it (control API).
        self.stop_requested = trio.Event()
        # What one remote peer may cost us: stream caps, bounded gossip intake (peer.caps).
        self.caps: StreamCaps = caps_for(host)
        self.intake: PubsubIntake = intake_for(pubsub)

    @property
    def ad(self) -> CapabilityAd | None:
        """The ad we published last (None for bootstrap and client roles)."""
        return self.discovery.current_ad

    async def find_ads(self, *, refresh: bool = True) -> list[CapabilityAd]:
        """Valid ads of every peer we know of, ours included; see peer.discovery."""
        return await self.discovery.find_ads(refresh=refresh)

    async def find_ad(self, peer_id: str) -> CapabilityAd | None:
        return await self.discovery.find_ad(peer_id)

    async def find_providers(self, cid: str) -> list[Provider]:
        """Servers of ``cid``: DHT provider records, with addresses from their (cached) ads."""
        return await self.discovery.find_executors(cid)

    def set_load(self, load: float, queue: int) -> None:
        """Record current load/queue; the ad is re-published shortly (at most once a second)."""
        self.discovery.set_load(load, queue)

    def models_changed(self) -> None:
        """The models source changed: re-publish the ad and provide any new cid."""
        self.discovery.request_publish()

    async def connect(self, address: str) -> str:
        """Dial a full multiaddr (``.../p2p/<id>``) and return the peer id."""
        info = await connect(self.host, address)
        return str(info.peer_id)

    def connected_peers(self) -> list[str]:
        return sorted(str(p) for p in self.host.get_connected_peers())

    def _market(self) -> MarketService:
        if self.market is None:
            raise RuntimeError(f"this peer (role {self.role!r}) runs no job market")
        return self.market

    async def infer(self, model: str, inputs: Any, **kw: Any) -> InferResult:
        """One job through the market; see ``MarketService.infer`` (max_price, deadline, ...).

        ``spot_check`` defaults to the ``spot_check`` setting (0.05)."""
        kw.setdefault("spot_check", self.config.spot_check)
        from peer import metrics

        metrics.JOBS_REQUESTED.labels("infer").inc()
        try:
            with metrics.JOB_SECONDS.time():
                return await self._market().infer(model, inputs, **kw)
        except Exception as exc:
            metrics.JOBS_FAILED.labels(metrics.failure_reason(exc)).inc()
            raise

    def lease(self, model: str, **kw: Any) -> AbstractAsyncContextManager[Lease]:
        """Hold one executor for many jobs; see ``MarketService.lease``."""
        return self._market().lease(model, **kw)

    async def fetch_model(
        self, cid: str, *, name: str | None = None, progress: Progress | None = None
    ) -> ModelEntry:
        """Fetch a model by sha256 cid from its providers, verified and admitted; then serve it.

        Raises ``peer.model_transfer.ModelFetchError`` (``NoProviders``,
        ``TransferFailed``, ``ModelRejected``) with a one-line message.
        """
        if self.models is None:
            raise RuntimeError(f"this peer (role {self.role!r}) does not fetch models")
        return (await self.models.fetch(cid, name=name, progress=progress)).entry

    @property
    def receipts(self) -> ReceiptBook:
        """Receipts of jobs this peer ran or paid for; ``.on_receipt`` hooks settlement in."""
        return self._market().receipts


async def _start_settlement(peer: Peer, stack: AsyncExitStack) -> None:
    """Open the ledger and settlement service; hook the market's receipts into it.

    The network is the genesis the peer finds (``peer.settlement.network``): a
    bootstrap node with none founds one and witnesses for it.
    """
    from peer.ledger_store import LedgerInUse  # SQLite + trio-asyncio: only when used
    from peer.settlement import open_peer_settlement

    try:
        service = await stack.enter_async_context(
            open_peer_settlement(peer, peer.config, optional=True, role=peer.role)
        )
    except LedgerInUse as exc:
        if peer.role != "client":
            raise
        # A short-lived client (`edgeswarm infer`) beside a running peer of the same
        # identity: that peer owns the ledger and pays what this client's jobs owe
        # once anti-entropy brings it the receipts.
        log.warning("settlement left to the running peer: %s", exc)
        return
    peer.settlement = service
    if service is not None and peer.market is not None:
        market = peer.market
        market.on_receipt.append(service.on_market_receipt)
        if service.epochs is not None:  # a standing peer names what it serves (referee panels)
            service.epochs.models = lambda: tuple(market.served)


@asynccontextmanager
async def open_peer(
    config: Config,
    *,
    models: ModelsSource = None,
    role: Role = "peer",
    hardware: Any = None,
    key: nacl.signing.SigningKey | None = None,
    one_connection_per_peer: bool = True,
    runtime: Any = None,
    market: bool | None = None,
    settlement: bool | None = None,
    registry: Any = None,
) -> AsyncIterator[Peer]:
    """Start a peer (host, DHT, gossipsub, ad publisher, bootstrap links); stop it all on exit.

    ``models``: what the ad lists and what is provided in the DHT, as an
    iterable of ``(cid, name, p50_ms)`` or a callable returning one (called at
    every publish; call ``peer.models_changed()`` after a change).
    ``hardware``: an ``edge_models.hardware.HardwareInfo`` (probed once per
    process if None). ``key``: use this identity instead of the data dir's
    (``edgeswarm peers`` uses a throw-away key so it never impersonates a
    running peer that shares its data dir). ``market`` (default: role
    "peer") runs the job market (``peer.infer``/``peer.lease``); with an
    ``edge_models`` ``runtime`` the peer also serves every model in its registry
    (and, when ``models`` is None, its ad lists them). ``settlement`` (default:
    roles "peer" and "bootstrap") runs the ledger (``peer.settlement``): receipts
    from the market are stored and the ones we owe are paid through the witnesses;
    a bootstrap node is itself a witness. ``registry`` (default: the runtime's, or
    ``<data dir>/models``) is where ``peer.fetch_model`` installs models and what
    a "peer" serves over ``/edgeswarm/model/1``. Raises ``peer.identity.IdentityError``,
    ``peer.host.AddressError`` or ``peer.host.ListenError`` with a clear message
    before anything starts running.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if config.reachability not in ("auto", "public", "private"):
        raise ConfigError(
            f"reachability must be auto, public or private, got {config.reachability!r}"
        )
    if not MIN_AD_TTL <= config.ad_ttl <= AD_MAX_TTL:
        raise ConfigError(
            f"ad_ttl must be between {MIN_AD_TTL:.0f} and {AD_MAX_TTL:.0f} seconds, "
            f"got {config.ad_ttl}"
        )
    for address in config.bootstrap:
        peer_info_from_addr(address)  # AddressError now, not in a background task
    if config.http and role != "client":
        from peer.http import parse_bind

        parse_bind(config.http)  # HttpConfigError (a ConfigError) before anything starts
    from peer.model_transfer import serve_cids

    serve_cids(config)  # ConfigError now, not in a background task
    run_market = role == "peer" if market is None else market and role != "bootstrap"
    run_settlement = role != "client" if settlement is None else settlement
    market_box: list[Any] = []
    if runtime is not None and models is None:

        def served() -> list[tuple[str, str, float]]:
            return market_box[0].models_source() if market_box else []

        models = served
    key_from_dir = key is None
    if key is None:
        key = load_or_create_identity(config.key_path)
    # A peer or bootstrap node owns its data dir: a second process with the same
    # identity would split the peer id and could equivocate in the ledger.
    owns_dir = role != "client" and key_from_dir
    dir_lock = (
        exclusive_lock(config.data_dir / PEER_LOCK, _dir_in_use(config))
        if owns_dir
        else contextlib.nullcontext()
    )
    with dir_lock:
        host = build_host(
            key,
            one_connection_per_peer=one_connection_per_peer,
            mdns=config.mdns,
            announce=config.announce,
            bootstrap=role == "bootstrap",
        )
        install_libp2p_filter()
        body_error: BaseException | None = None
        try:
            async with running_host(host, config.listen) as listen_addrs:
                mode = DHTMode.CLIENT if role == "client" else DHTMode.SERVER
                dht = KadDHT(host, mode, enable_random_walk=False)
                dht.register_validator(AD_NAMESPACE, AdValidator())
                gossipsub = GossipSub(
                    protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID],
                    degree=6,
                    degree_low=4,
                    degree_high=12,
                    heartbeat_interval=GOSSIP_HEARTBEAT,
                )
                pubsub = Pubsub(host, gossipsub)
                state: AdState | None = None
                if role == "peer":
                    hw = hardware if hardware is not None else _probe_hardware()
                    state = AdState(
                        addrs=tuple(a for a in reach_of(host).advertised() if len(a) <= 256)[
                            :MAX_ADDRS
                        ],
                        devices=_devices_of(hw),
                        providers=tuple(str(p)[:256] for p in hw.providers)[:16],
                        price=config.price,
                        models=models,
                    )
                discovery = Discovery(host, dht, key, state, ttl=config.ad_ttl)
                discovery.addrs_source = reach_of(host).advertised
                discovery.reachability_source = reach_of(host).ad_reachability
                peer = Peer(
                    config=config,
                    role=role,
                    key=key,
                    host=host,
                    dht=dht,
                    pubsub=pubsub,
                    gossipsub=gossipsub,
                    discovery=discovery,
                    listen_addrs=listen_addrs,
                )
                async with (
                    background_trio_service(pubsub),
                    background_trio_service(gossipsub),
                    background_trio_service(dht),
                    peer.reach.services(role, config, discovery.request_publish),
                ):
                    await pubsub.wait_until_ready()
                    watcher = _LinkWatcher()
                    host.get_network().register_notifee(watcher)
                    links = [BootstrapLink(peer, a, watcher) for a in config.bootstrap]
                    peer.bootstrap_links = links
                    first: dict[int, bool] = {}

                    async def first_attempt(i: int, link: BootstrapLink) -> None:
                        first[i] = await link.attempt()

                    # First dial to every bootstrap in parallel, so the first ad goes out
                    # to the network; failures continue in the background.
                    async with trio.open_nursery() as dials:
                        for i, link in enumerate(links):
                            dials.start_soon(first_attempt, i, link)
                    async with trio.open_nursery() as nursery:
                        await nursery.start(peer.intake.run)
                        for i, link in enumerate(links):
                            nursery.start_soon(link.run, first[i])
                        # The market first: models it serves are loaded and listed in the first ad.
                        if run_market:
                            # Imported here: the market pulls in onnxruntime (edge_models).
                            from peer.market import MarketService, MarketSettings

                            service = MarketService(
                                peer, settings=MarketSettings.from_config(config), runtime=runtime
                            )
                            await nursery.start(service.run)
                            peer.market = service
                            market_box.append(service)
                            if runtime is not None:
                                await service.serve()
                        if role != "bootstrap":
                            from peer.model_transfer import ModelTransfer

                            peer.models = ModelTransfer(
                                peer, registry or getattr(runtime, "registry", None)
                            )
                            if state is not None:
                                state.ipfs_of = peer.models.ipfs_of
                            if role == "peer":
                                await nursery.start(peer.models.run)
                        await nursery.start(discovery.run)
                        try:
                            async with AsyncExitStack() as stack:
                                if run_settlement:
                                    await _start_settlement(peer, stack)
                                if config.http and role != "client":
                                    from peer.http import open_http

                                    peer.http = await stack.enter_async_context(
                                        open_http(peer, config.http)
                                    )
                                yield peer
                        except BaseException as exc:
                            body_error = exc
                            raise
                        finally:
                            nursery.cancel_scope.cancel()
        except BaseExceptionGroup as whole:
            group = without_teardown_races(whole)
            if group is None:
                if body_error is not None:
                    raise body_error from None
                return  # only py-libp2p's shutdown race: the peer stopped cleanly
            reraise_lone_error(group, body_error)
            log_exception_leaves(log, group, "peer services failed")
            raise group from None
