"""Models travel between peers: ``/edgeswarm/model/1`` (serve and fetch, verified).

``ModelServer`` answers manifest and chunk requests for every model in the
registry. ``ModelFetcher.fetch(cid)`` finds the providers of a cid in the DHT,
asks several for the manifest, fetches chunks from all providers that agree on
it in parallel (16 chunks of 256 KiB per request, one stream per provider),
checks each chunk's sha256 before writing it at its offset in a partial file
under the registry's ``tmp/``, and hands the complete file to the registry,
which checks the whole file's sha256 against the cid and runs the admission
checks of ``models add`` before it moves the file into place.

* A provider that dies, stalls or refuses mid-way gives its outstanding chunks
  back to the others; when every provider is gone the fetcher looks for more
  providers (up to ``PROVIDER_ROUNDS`` times) and resumes from the chunks it
  holds.
* A provider that sends a chunk that does not match the manifest (or one it
  was not asked for, or garbage) is banned for the rest of the transfer.
* A manifest whose chunks all verify but whose file does not hash to the cid
  was a lie: everyone who sent it is banned and the next manifest (if another
  provider sent a different one) is tried.
* On any failure the partial file is deleted: nothing half-written stays.

Why not bitswap (``libp2p.bitswap``, measured in bench/models.py)? Its client
stores every block any peer pushes, wanted or not, cannot say which peer sent
a bad block (so it cannot ban one), broadcasts wantlists to every connected
peer rather than the providers, keeps a second copy of every model as block
files, and moved a 23 MB model at about half the speed of one plain stream.
The manifest gives the IPFS CIDv1 kubo would compute
(``protocols.model_wire.ipfs_cid_of``), so the ad can still carry it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from peer import metrics
from peer.discovery import Provider
from peer.host import retire_stream_handler
from protocols.codec import FrameDecoder, frame
from protocols.errors import ProtocolError
from protocols.model_wire import (
    CHUNK_FRAME_MAX,
    CHUNK_SIZE,
    MANIFEST_FRAME_MAX,
    MAX_BATCH,
    MODEL_PROTOCOL_ID,
    REQUEST_MAX,
    Chunk,
    ChunksRequest,
    Manifest,
    ManifestRequest,
    TransferError,
    check_cid,
    decode_request,
    decode_response,
    encode_chunk,
    encode_error,
    encode_manifest,
    encode_request,
)

if TYPE_CHECKING:
    from edge_models.registry import Registry
    from edge_models.spec import ModelEntry
    from peer.model_on_demand import OnDemand

log = logging.getLogger(__name__)

MODEL_PROTOCOL = TProtocol(MODEL_PROTOCOL_ID)
READ_SIZE = 256 * 1024
DIAL_TIMEOUT = 10.0
MANIFEST_TIMEOUT = 10.0
FRAME_TIMEOUT = 20.0  # a provider silent this long mid-request is given up on
FIND_TIMEOUT = 10.0  # how long to keep asking the DHT for providers
FIND_RETRY = 0.5
MAX_PROVIDERS = 4  # parallel streams per transfer
PROVIDER_ROUNDS = 3  # fresh provider lookups after every provider failed
SERVER_IDLE = 30.0
SERVER_STREAMS_PER_PEER = 4
SERVER_STREAMS = 32
SERVE_RETRY_START = 2.0  # `serve` models that cannot be fetched yet: backoff
SERVE_RETRY_MAX = 60.0

Progress = Callable[[int, int], None]
"""Called with (bytes verified and written, total bytes)."""


class ModelFetchError(Exception):
    """A model could not be fetched; the message is one line for the user."""


class NoProviders(ModelFetchError):
    """Nobody (reachable) provides the cid."""


class TransferFailed(ModelFetchError):
    """Providers were found but the bytes did not all arrive (verified)."""


class ModelRejected(ModelFetchError):
    """The bytes arrived and match the cid, but the registry refuses the model."""


@dataclass
class FetchResult:
    entry: ModelEntry
    seconds: float = 0.0
    bytes_from: dict[str, int] = field(default_factory=dict)  # provider -> verified bytes
    banned: dict[str, str] = field(default_factory=dict)  # provider -> why
    failed: dict[str, str] = field(default_factory=dict)  # provider -> why (not banned)
    already: bool = False  # was in the registry: nothing moved


class _Frames:
    """Length-prefixed frames on one libp2p stream, with a receive cap per call."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._decoder = FrameDecoder(max_size=REQUEST_MAX)

    @property
    def peer(self) -> str:
        return str(self.stream.muxed_conn.peer_id)

    async def send(self, payload: bytes, *, max_size: int) -> None:
        await self.stream.write(frame(payload, max_size=max_size))

    async def receive(self, *, max_size: int) -> bytes | None:
        """The next frame (at most ``max_size`` bytes), or None at the end of the stream."""
        self._decoder.max_size = max_size
        while True:
            raw = self._decoder.next_frame()
            if raw is not None:
                return raw
            try:
                data = await self.stream.read(READ_SIZE)
            except trio.Cancelled:
                raise
            except Exception:  # reset, EOF, connection gone: all the end for us
                return None
            if not data:
                return None
            self._decoder.feed(data)

    async def close(self, *, reset: bool = False) -> None:
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(2.0),
            contextlib.suppress(Exception),
        ):
            await (self.stream.reset() if reset else self.stream.close())


# ------------------------------------------------------------------ serving


def manifest_of_file(cid: str, path: Path) -> Manifest:
    """Chunk hashes of a model file; ``ValueError`` if the file no longer hashes to ``cid``."""
    whole = hashlib.sha256()
    hashes: list[bytes] = []
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            whole.update(chunk)
            hashes.append(hashlib.sha256(chunk).digest())
            size += len(chunk)
    if whole.hexdigest() != cid:
        raise ValueError(f"model file {path} no longer hashes to its cid {cid} (corrupt on disk)")
    return Manifest(cid=cid, size=size, chunk_size=CHUNK_SIZE, hashes=tuple(hashes))


class ModelServer:
    """Serves ``/edgeswarm/model/1`` for every model in ``registry``."""

    def __init__(
        self,
        host: Any,
        registry: Registry,
        *,
        streams_per_peer: int = SERVER_STREAMS_PER_PEER,
        max_streams: int = SERVER_STREAMS,
    ) -> None:
        self.host = host
        self.registry = registry
        self.streams_per_peer = streams_per_peer
        self.max_streams = max_streams
        self._active: dict[str, int] = {}
        self._manifests: dict[str, tuple[int, int, Manifest]] = {}  # cid -> (mtime, size, m)
        self._locks: dict[str, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self.served_bytes = 0

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.host.set_stream_handler(MODEL_PROTOCOL, self._on_stream)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                with contextlib.suppress(Exception):
                    retire_stream_handler(self.host, MODEL_PROTOCOL)
                nursery.cancel_scope.cancel()

    async def _on_stream(self, stream: Any) -> None:
        peer = str(stream.muxed_conn.peer_id)
        total = sum(self._active.values())
        if (
            self._nursery is None
            or self._active.get(peer, 0) >= self.streams_per_peer
            or total >= self.max_streams
        ):
            with contextlib.suppress(Exception):
                await stream.reset()
            return
        self._active[peer] = self._active.get(peer, 0) + 1
        self._nursery.start_soon(self._serve, _Frames(stream), peer)

    async def _serve(self, frames: _Frames, peer: str) -> None:
        try:
            while True:
                raw = None
                with trio.move_on_after(SERVER_IDLE):
                    raw = await frames.receive(max_size=REQUEST_MAX)
                if raw is None:
                    return
                try:
                    req = decode_request(raw)
                except ProtocolError as exc:
                    await self._error(frames, "bad-request", str(exc))
                    return
                if not await self._answer(frames, req):
                    return
        except ProtocolError as exc:  # an oversize request frame
            log.debug("model stream from %s: %s", peer, exc)
        except Exception as exc:  # a write to a peer that went away
            log.debug("model stream from %s ended: %s", peer, exc)
        finally:
            self._active[peer] -= 1
            if not self._active[peer]:
                del self._active[peer]
            await frames.close()

    async def _answer(self, frames: _Frames, req: ManifestRequest | ChunksRequest) -> bool:
        manifest = await self.manifest(req.cid)
        if manifest is None:
            await self._error(frames, "not-found", f"this peer does not hold model {req.cid}")
            return False
        if isinstance(req, ManifestRequest):
            await frames.send(encode_manifest(manifest), max_size=MANIFEST_FRAME_MAX)
            return True
        if any(i >= manifest.count for i in req.indexes):
            await self._error(frames, "bad-request", f"the model has {manifest.count} chunks")
            return False
        try:
            path = self.registry.path_of(req.cid)
            with path.open("rb") as f:
                for i in req.indexes:
                    data = self.read_chunk(f, manifest, i)
                    await frames.send(encode_chunk(i, data), max_size=CHUNK_FRAME_MAX)
                    self.served_bytes += len(data)
        except OSError as exc:
            await self._error(frames, "unavailable", f"cannot read model {req.cid}: {exc}")
            return False
        return True

    def read_chunk(self, f: Any, manifest: Manifest, index: int) -> bytes:
        offset, length = manifest.span(index)
        data: bytes = os.pread(f.fileno(), length, offset)
        return data

    async def _error(self, frames: _Frames, code: str, message: str) -> None:
        with contextlib.suppress(Exception):
            await frames.send(encode_error(code, message), max_size=REQUEST_MAX)

    async def manifest(self, cid: str) -> Manifest | None:
        """The manifest of a model we hold (hashed once per file version), or None."""
        try:
            path = self.registry.path_of(self.registry.get(cid).cid)
            st = path.stat()
        except Exception:  # not held, or removed meanwhile
            return None
        lock = self._locks.setdefault(cid, trio.Lock())
        async with lock:
            cached = self._manifests.get(cid)
            if cached is not None and cached[:2] == (st.st_mtime_ns, st.st_size):
                return cached[2]
            try:
                m = await trio.to_thread.run_sync(manifest_of_file, cid, path)
            except (OSError, ValueError) as exc:
                log.error("not serving model %s: %s", cid, exc)
                return None
            self._manifests[cid] = (st.st_mtime_ns, st.st_size, m)
            return m


# ------------------------------------------------------------------ fetching


@dataclass
class _Source:
    peer_id: str
    frames: _Frames
    manifest: Manifest


class _Transfer:
    """One fetch of one manifest's chunks into one partial file."""

    def __init__(
        self,
        manifest: Manifest,
        path: Path,
        fd: int,
        result: FetchResult,
        progress: Progress | None,
    ) -> None:
        self.manifest = manifest
        self.digest = manifest.digest()
        self.path = path
        self.fd = fd
        self.result = result
        self.progress = progress
        self.pending: deque[int] = deque(range(manifest.count))
        self.done: set[int] = set()
        self.done_bytes = 0
        self._changed = trio.Event()
        self.active = 0

    @property
    def complete(self) -> bool:
        return len(self.done) == self.manifest.count

    async def run(self, sources: list[_Source]) -> None:
        """Fetch what is missing from ``sources`` in parallel, until done or all failed."""
        async with trio.open_nursery() as nursery:
            for src in sources:
                nursery.start_soon(self.work, src)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def work(self, src: _Source) -> None:
        """Fetch chunks from one provider until none are left or it fails."""
        self.active += 1
        taken: list[int] = []
        try:
            while not self.complete:
                if not self.pending:
                    if self.active <= 1 and not taken:
                        return  # nothing pending and nobody else holds chunks
                    await self._changed.wait()
                    continue
                taken = [self.pending.popleft() for _ in range(min(MAX_BATCH, len(self.pending)))]
                why = await self._batch(src, taken)
                if why is not None:
                    return
                taken = []
        finally:
            self.active -= 1
            if taken:
                self.pending.extendleft(reversed([i for i in taken if i not in self.done]))
            self._notify()
            await src.frames.close(reset=not self.complete)

    async def _batch(self, src: _Source, indexes: list[int]) -> str | None:
        """Ask for ``indexes`` and store what verifies; the reason if the provider failed."""
        pid = src.peer_id
        try:
            await src.frames.send(
                encode_request(ChunksRequest(self.manifest.cid, tuple(indexes))),
                max_size=REQUEST_MAX,
            )
        except Exception as exc:
            return self._fail(pid, f"cannot send a request: {str(exc) or type(exc).__name__}")
        for want in indexes:
            raw = None
            try:
                with trio.move_on_after(FRAME_TIMEOUT):
                    raw = await src.frames.receive(max_size=CHUNK_FRAME_MAX)
                    if raw is None:
                        return self._fail(pid, "closed the stream mid-transfer")
                item = decode_response(raw, max_size=CHUNK_FRAME_MAX) if raw else None
            except ProtocolError as exc:
                return self._ban(pid, f"sent a malformed frame ({exc})")
            if item is None:
                return self._fail(pid, f"sent nothing for {FRAME_TIMEOUT:.0f} s")
            if isinstance(item, TransferError):
                return self._fail(pid, f"refused: {item.message}")
            if not isinstance(item, Chunk) or item.index != want:
                return self._ban(pid, f"sent something other than chunk {want}")
            if not self.manifest.chunk_ok(want, item.data):
                return self._ban(pid, f"sent a corrupt chunk {want} (sha256 mismatch)")
            offset, _ = self.manifest.span(want)
            os.pwrite(self.fd, item.data, offset)
            self.done.add(want)
            self.done_bytes += len(item.data)
            metrics.MODEL_FETCH_BYTES.inc(len(item.data))
            self.result.bytes_from[pid] = self.result.bytes_from.get(pid, 0) + len(item.data)
            if self.progress is not None:
                self.progress(self.done_bytes, self.manifest.size)
        return None

    def _fail(self, pid: str, why: str) -> str:
        log.info("provider %s: %s", pid, why)
        self.result.failed[pid] = why
        return why

    def _ban(self, pid: str, why: str) -> str:
        log.warning("provider %s banned for this transfer: %s", pid, why)
        self.result.banned[pid] = why
        return why


FindProviders = Callable[[str], Awaitable[list[Provider]]]
NameOf = Callable[[str, list[str]], Awaitable[str | None]]
"""(cid, provider ids) -> the name a provider gives the model, if any."""
NAME_TIMEOUT = 3.0


class ModelFetcher:
    """Fetches models by cid from the peers that provide them (see the module docstring)."""

    def __init__(
        self,
        host: Any,
        registry: Registry,
        find_providers: FindProviders,
        *,
        find_timeout: float = FIND_TIMEOUT,
        max_providers: int = MAX_PROVIDERS,
        name_of: NameOf | None = None,
    ) -> None:
        self.name_of = name_of
        self.host = host
        self.registry = registry
        self.find_providers = find_providers
        self.find_timeout = find_timeout
        self.max_providers = max_providers
        self.self_id = str(host.get_id())
        self._inflight: dict[str, trio.Event] = {}

    async def fetch(
        self, cid: str, *, name: str | None = None, progress: Progress | None = None
    ) -> FetchResult:
        try:
            check_cid(cid)
        except ProtocolError as exc:
            raise ModelFetchError(str(exc)) from None
        while cid in self._inflight:  # one transfer per cid; others wait for it
            await self._inflight[cid].wait()
        if cid in self.registry:
            return FetchResult(entry=self.registry.get(cid), already=True)
        self._inflight[cid] = trio.Event()
        try:
            return await self._fetch(cid, name, progress)
        finally:
            self._inflight.pop(cid).set()

    async def _fetch(self, cid: str, name: str | None, progress: Progress | None) -> FetchResult:
        t0 = time.monotonic()
        result = FetchResult(entry=None)  # type: ignore[arg-type]  # set on success
        tried: set[str] = set()
        current: _Transfer | None = None
        with contextlib.ExitStack() as files:
            for _round in range(PROVIDER_ROUNDS):
                providers = await self._providers(cid, exclude=set(result.banned), first=not tried)
                fresh = [p for p in providers if p.peer_id not in tried][: self.max_providers]
                if not fresh:
                    break
                tried |= {p.peer_id for p in fresh}
                sources = await self._open_sources(cid, fresh, result)
                try:
                    for group in _by_manifest(sources, current):
                        manifest = group[0].manifest
                        self._check_size(cid, manifest)
                        if current is None or current.digest != manifest.digest():
                            # A new partial file: chunks verified against another manifest
                            # say nothing about this one.
                            part = files.enter_context(self.registry.partial_file())
                            fd = os.open(part, os.O_RDWR)
                            files.callback(os.close, fd)
                            os.ftruncate(fd, manifest.size)
                            current = _Transfer(manifest, part, fd, result, progress)
                        await current.run(group)
                        if not current.complete:
                            continue  # all of this group failed; resume with the next one
                        entry = await self._install(cid, current, name, group, result)
                        if entry is not None:
                            result.entry = entry
                            result.seconds = time.monotonic() - t0
                            return result
                        current = None
                finally:
                    for s in sources:
                        await s.frames.close(reset=True)
        raise TransferFailed(_failure_line(cid, result))

    def _check_size(self, cid: str, manifest: Manifest) -> None:
        limit = self.registry.limits.max_model_bytes
        if manifest.size > limit:
            raise ModelRejected(
                f"model {cid} is {manifest.size} bytes, above the model size limit of "
                f"{limit} bytes (nothing was downloaded)"
            )

    async def _install(
        self,
        cid: str,
        transfer: _Transfer,
        name: str | None,
        group: list[_Source],
        result: FetchResult,
    ) -> ModelEntry | None:
        """Admit the complete file; None (and the group banned) if it does not hash to cid."""
        from edge_models.errors import InvalidModel

        senders = sorted(
            p for p, n in result.bytes_from.items() if n > 0 and p not in result.banned
        )
        default = "model"
        if name is None and self.name_of is not None:
            with trio.move_on_after(NAME_TIMEOUT):
                default = await self.name_of(cid, senders) or default
        install = functools.partial(
            self.registry.install_partial,
            transfer.path,
            name,
            source="peers:" + ",".join(senders),
            expected_cid=cid,
            default_name=default,
        )
        try:
            entry: ModelEntry = await trio.to_thread.run_sync(install)
        except InvalidModel as exc:
            if "hash to" not in str(exc):
                raise ModelRejected(f"model {cid} was fetched but refused: {exc}") from None
            for s in group:  # every chunk matched their manifest: the manifest lied
                result.banned[s.peer_id] = "its manifest does not add up to the cid"
            return None
        return entry

    async def _providers(self, cid: str, *, exclude: set[str], first: bool) -> list[Provider]:
        """Providers of ``cid`` from the DHT (not us, not banned); waits a while for the first."""
        found: list[Provider] = []
        with trio.move_on_after(self.find_timeout if first else FIND_RETRY * 4):
            while True:
                try:
                    found = [
                        p
                        for p in await self.find_providers(cid)
                        if p.peer_id != self.self_id and p.peer_id not in exclude
                    ]
                except Exception as exc:  # a DHT hiccup: ask again
                    log.debug("find_providers(%s) failed: %s", cid, exc)
                if found:
                    break
                await trio.sleep(FIND_RETRY)  # polling the DHT, bounded by the scope
        if not found and first:
            raise NoProviders(
                f"no peer provides model {cid} (asked the DHT for {self.find_timeout:.0f} s)"
            )
        return found

    async def _open_sources(
        self, cid: str, providers: Sequence[Provider], result: FetchResult
    ) -> list[_Source]:
        """Ask up to ``max_providers`` providers for the manifest, in parallel."""
        sources: list[_Source] = []

        async def one(p: Provider) -> None:
            frames = None
            try:
                with trio.fail_after(DIAL_TIMEOUT + MANIFEST_TIMEOUT):
                    frames = _Frames(await self._open(p))
                    await frames.send(encode_request(ManifestRequest(cid)), max_size=REQUEST_MAX)
                    raw = await frames.receive(max_size=MANIFEST_FRAME_MAX)
                if raw is None:
                    raise ModelFetchError("closed the stream")
                item = decode_response(raw, max_size=MANIFEST_FRAME_MAX)
            except ProtocolError as exc:
                result.banned[p.peer_id] = f"sent a bad manifest ({exc})"
            except trio.TooSlowError:
                result.failed[p.peer_id] = "did not answer in time"
            except Exception as exc:  # dial errors of every kind: this provider is out
                result.failed[p.peer_id] = f"unreachable ({str(exc)[:200] or type(exc).__name__})"
            else:
                if isinstance(item, Manifest) and item.cid == cid:
                    sources.append(_Source(p.peer_id, frames, item))
                    return
                if isinstance(item, TransferError):
                    result.failed[p.peer_id] = f"refused: {item.message}"
                else:
                    result.banned[p.peer_id] = "answered with something other than the manifest"
            if frames is not None:
                await frames.close(reset=True)

        async with trio.open_nursery() as nursery:
            for p in providers:
                nursery.start_soon(one, p)
        return sources

    async def manifest_from(self, provider: Provider, cid: str) -> Manifest | None:
        """Ask one provider for ``cid``'s manifest (e.g. for its size); None if it cannot say."""
        try:
            with trio.fail_after(DIAL_TIMEOUT + MANIFEST_TIMEOUT):
                frames = _Frames(await self._open(provider))
                try:
                    await frames.send(encode_request(ManifestRequest(cid)), max_size=REQUEST_MAX)
                    raw = await frames.receive(max_size=MANIFEST_FRAME_MAX)
                finally:
                    await frames.close()
            item = decode_response(raw, max_size=MANIFEST_FRAME_MAX) if raw else None
        except Exception as exc:  # unreachable, refusing or garbage: it cannot say
            log.debug("no manifest of %s from %s: %s", cid, provider.peer_id, exc)
            return None
        return item if isinstance(item, Manifest) and item.cid == cid else None

    async def _open(self, p: Provider) -> Any:
        pid = ID.from_base58(p.peer_id)
        network = self.host.get_network()
        if pid not in network.connections:
            addrs = [Multiaddr(a.split("/p2p/")[0]) for a in p.addrs]
            await self.host.connect(PeerInfo(pid, addrs))
        return await self.host.new_stream(pid, [MODEL_PROTOCOL])


def _by_manifest(sources: list[_Source], current: _Transfer | None) -> list[list[_Source]]:
    """Sources grouped by the manifest they sent: the one being fetched first, then most agreed."""
    groups: dict[bytes, list[_Source]] = {}
    for s in sources:
        groups.setdefault(s.manifest.digest(), []).append(s)
    ongoing = current.digest if current is not None else b""
    return sorted(groups.values(), key=lambda g: (g[0].manifest.digest() != ongoing, -len(g)))


def _failure_line(cid: str, result: FetchResult) -> str:
    why = [f"{p[:16]}...: {w} (banned)" for p, w in result.banned.items()]
    why += [f"{p[:16]}...: {w}" for p, w in result.failed.items() if p not in result.banned]
    got = sum(result.bytes_from.values())
    return (
        f"could not fetch model {cid}: {got} bytes verified, then no provider was left "
        f"({'; '.join(why) or 'none answered'}); nothing was kept"
    )


__all__ = [
    "MODEL_PROTOCOL",
    "FetchResult",
    "ModelFetchError",
    "ModelFetcher",
    "ModelRejected",
    "ModelServer",
    "NoProviders",
    "TransferFailed",
]


def serve_cids(config: Any) -> tuple[str, ...]:
    """The ``serve`` setting, checked: every entry a model cid (``ConfigError`` otherwise)."""
    from peer.config import ConfigError

    out: list[str] = []
    for value in getattr(config, "serve", ()):
        cid = value.lower().removeprefix("sha256:")
        try:
            check_cid(cid)
        except ProtocolError:
            raise ConfigError(
                f"serve: {value!r:.80} is not a model cid (the sha256 of the model: 64 hex digits)"
            ) from None
        if cid not in out:
            out.append(cid)
    return tuple(out)


class ModelTransfer:
    """A peer's side of model transfer: the server (peers that serve) and the fetcher.

    The registry is the one the peer's runtime uses, or ``<data dir>/models``
    opened on first use (``edgeswarm models fetch`` needs no runtime).
    """

    def __init__(self, peer: Any, registry: Registry | None = None) -> None:
        self.peer = peer
        self._registry = registry
        self.server: ModelServer | None = None
        self._fetcher: ModelFetcher | None = None
        self.on_demand: OnDemand | None = None

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            from edge_models.registry import Registry

            self._registry = Registry(self.peer.config.data_dir / "models")
        return self._registry

    @property
    def fetcher(self) -> ModelFetcher:
        if self._fetcher is None:
            self._fetcher = ModelFetcher(
                self.peer.host,
                self.registry,
                self.peer.discovery.find_providers,
                name_of=self._name_in_ads,
            )
        return self._fetcher

    async def _name_in_ads(self, cid: str, providers: list[str]) -> str | None:
        """The name the first provider's ad gives ``cid`` (a hint: names are not unique)."""
        for pid in providers[:2]:
            try:
                ad = await self.peer.discovery.find_ad(pid, walk=False)
            except Exception as exc:  # an ad lookup is only a nicety here
                log.debug("no ad of %s: %s", pid, exc)
                continue
            for offer in ad.models if ad is not None else ():
                if offer.cid == cid and offer.name:
                    return str(offer.name)
        return None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve ``/edgeswarm/model/1``; fetch the configured ``serve`` cids we lack."""
        self.server = ModelServer(self.peer.host, self.registry)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.server.run)
            for cid in serve_cids(self.peer.config):
                nursery.start_soon(self._keep_fetching, cid)
            nursery.start_soon(self._backfill_ipfs_cids)
            market = getattr(self.peer, "market", None)
            if self.peer.config.fetch_on_demand and getattr(market, "executor", None) is not None:
                from peer.model_on_demand import OnDemand

                self.on_demand = OnDemand(self)
                await nursery.start(self.on_demand.run)
            task_status.started()

    def ipfs_of(self, cid: str) -> str:
        """The IPFS CIDv1 the registry holds for ``cid`` ("" if unknown), for our ad."""
        from edge_models.errors import EdgeModelError

        try:
            return self.registry.get(cid).ipfs_cid
        except EdgeModelError:
            return ""

    async def _backfill_ipfs_cids(self) -> None:
        """Models added before entries carried an IPFS CID get one (hashed in a thread)."""
        from edge_models.errors import EdgeModelError

        missing = [e.cid for e in self.registry.list() if not e.ipfs_cid]
        for cid in missing:
            try:
                await trio.to_thread.run_sync(self.registry.ensure_ipfs_cid, cid)
            except (EdgeModelError, OSError) as exc:
                log.warning("no IPFS CID for model %s: %s", cid, exc)
        if missing:
            self.peer.models_changed()

    async def _keep_fetching(self, cid: str) -> None:
        """Fetch (then serve) one configured model, retrying until it is here or refused."""
        delay = SERVE_RETRY_START
        while True:
            try:
                result = await self.fetch(cid)
            except ModelRejected as exc:
                log.error("not serving %s: %s", cid, exc)
                return
            except ModelFetchError as exc:
                log.warning("%s; trying again in %.0f s", exc, delay)
            else:
                if not result.already:
                    log.info(
                        "fetched %s (%s, %d bytes) in %.2f s from %d peer(s)",
                        result.entry.name,
                        cid,
                        result.entry.size,
                        result.seconds,
                        len(result.bytes_from),
                    )
                return
            await trio.sleep(delay)  # backoff between attempts, for as long as the peer runs
            delay = min(delay * 2, SERVE_RETRY_MAX)

    async def fetch(
        self,
        cid: str,
        *,
        name: str | None = None,
        progress: Progress | None = None,
        serve: bool = True,
    ) -> FetchResult:
        """Fetch ``cid`` (see ``ModelFetcher``); then serve it if this peer serves models."""
        result = await self.fetcher.fetch(cid, name=name, progress=progress)
        market = getattr(self.peer, "market", None)
        if (
            serve
            and market is not None
            and market.executor is not None
            and result.entry.cid not in market.served
        ):
            await market.serve([result.entry.cid])
        return result
