"""Models travel between real libp2p hosts on 127.0.0.1: fetch by cid, verified, then serve.

Every peer is a full ``open_peer`` with its own data dir, registry and
runtime (as ``edgeswarm run`` builds it); providers are found through the DHT
of a real bootstrap node. Bad providers are real peers whose model server has
been made to lie.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from market_swarm import FakeHardware, config

from bootstrap.node import open_bootstrap
from edge_models.limits import ModelLimits
from edge_models.registry import Registry
from edge_models.runtime import ModelRuntime
from peer.discovery import provider_key
from peer.model_transfer import (
    ModelRejected,
    ModelServer,
    NoProviders,
    TransferFailed,
    manifest_of_file,
)
from peer.node import Peer, open_peer
from protocols.model_wire import CHUNK_SIZE, Manifest
from tests import models

BIG = 8 * 1024 * 1024  # 32 chunks: more than two requests' worth


@dataclass
class Node:
    name: str
    peer: Peer
    registry: Registry
    scope: trio.CancelScope
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def server(self) -> ModelServer:
        assert self.peer.models is not None and self.peer.models.server is not None
        return self.peer.models.server

    def store_files(self) -> list[str]:
        root = self.registry.root
        return sorted(p.name for d in ("blobs", "tmp", "meta") for p in (root / d).iterdir())


@dataclass
class Net:
    tmp_path: Path
    nursery: trio.Nursery
    boot: Peer
    nodes: dict[str, Node] = field(default_factory=dict)

    async def start(
        self,
        name: str,
        files: tuple[Path, ...] = (),
        limits: ModelLimits | None = None,
        **settings: Any,
    ) -> Node:
        registry = Registry(self.tmp_path / name / "models", limits=limits or ModelLimits())
        for f in files:
            registry.add_file(f)
        runtime = ModelRuntime(registry, p50_runs=1)
        cfg = config(self.tmp_path, name, bootstrap=(self.boot.listen_addrs[0],), **settings)
        ready: list[Node] = []

        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with trio.CancelScope() as scope:
                    async with open_peer(
                        cfg, hardware=FakeHardware(), runtime=runtime, settlement=False
                    ) as peer:
                        ready.append(Node(name, peer, registry, scope))
                        task_status.started()
                        await trio.sleep_forever()
            finally:
                runtime.close()
                if ready:
                    ready[0].stopped.set()

        await self.nursery.start(run)
        self.nodes[name] = ready[0]
        return ready[0]

    async def kill(self, name: str) -> None:
        node = self.nodes[name]
        node.scope.cancel()
        with trio.fail_after(15):
            await node.stopped.wait()


@asynccontextmanager
async def net(tmp_path: Path) -> AsyncIterator[Net]:
    async with open_bootstrap(config(tmp_path, "boot")) as boot, trio.open_nursery() as nursery:
        try:
            yield Net(tmp_path, nursery, boot)
        finally:
            nursery.cancel_scope.cancel()


async def wait_providers(node: Node, cid: str, n: int) -> None:
    """Until ``node`` finds ``n`` providers of ``cid`` (real DHT queries, bounded)."""
    with trio.fail_after(20):
        while True:
            if len({p.peer_id for p in await node.peer.discovery.find_providers(cid)}) >= n:
                return
            await trio.sleep(0.2)


def big_model(tmp_path: Path, seed: int = 1) -> tuple[Path, str]:
    path = models.tiny_padded_model(tmp_path / f"big{seed}.onnx", BIG, seed=seed)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


async def test_a_fetched_model_is_served_even_after_its_only_holder_is_killed(
    tmp_path: Path,
) -> None:
    src = models.tiny_matmul_model(tmp_path / "mm.onnx")
    cid = hashlib.sha256(src.read_bytes()).hexdigest()
    async with net(tmp_path) as n:
        holder = await n.start("holder", (src,))
        fetcher = await n.start("fetcher")
        requester = await n.start("requester")
        await wait_providers(fetcher, cid, 1)
        with trio.fail_after(30):
            entry = await fetcher.peer.fetch_model(cid)
        assert entry.cid == cid and entry.name == "mm"  # the name in the holder's ad
        assert entry.source == f"peers:{holder.peer.peer_id}"
        # Both ads carry the IPFS CIDv1 of the bytes: one chunk, so a raw block of the sha256.
        assert entry.ipfs_cid.startswith("bafkrei")
        assert holder.peer.ad is not None
        assert [(m.cid, m.ipfs) for m in holder.peer.ad.models] == [(cid, entry.ipfs_cid)]
        assert fetcher.registry.path_of(cid).read_bytes() == src.read_bytes()
        assert fetcher.peer.market is not None and cid in fetcher.peer.market.served
        # The fetcher now provides the cid itself; the only original holder goes away.
        await wait_providers(requester, cid, 2)
        await n.kill("holder")
        x = np.ones((2, 4), dtype=np.float32)
        with trio.fail_after(30):
            result = await requester.peer.infer(cid, {"x": x}, deadline=20)
        assert result.executor == fetcher.peer.peer_id
        assert result.outputs["y"].shape == (2, 3)
        # And it serves the bytes on: a newcomer fetches from the fetcher.
        late = await n.start("late")
        with trio.fail_after(30):
            got = await late.peer.fetch_model(cid)
        assert got.source == f"peers:{fetcher.peer.peer_id}"


async def test_a_transfer_resumes_after_its_provider_dies_mid_way(tmp_path: Path) -> None:
    path, cid = big_model(tmp_path)
    async with net(tmp_path) as n:
        a = await n.start("a", (path,))
        b = await n.start("b", (path,))
        c = await n.start("c")
        await wait_providers(c, cid, 2)
        assert c.peer.models is not None
        fetcher = c.peer.models.fetcher
        fetcher.max_providers = 1  # one provider at a time: the second must resume
        killed: list[Node] = []

        def progress(done: int, total: int) -> None:
            if not killed and done >= total // 3:
                first = next(x for x in (a, b) if x.server.served_bytes > 0)
                killed.append(first)
                first.scope.cancel()  # the provider dies mid-transfer

        with trio.fail_after(60):
            result = await fetcher.fetch(cid, progress=progress)
        assert result.entry.cid == cid
        dead = killed[0]
        other = b if dead is a else a
        assert dead.peer.peer_id in result.failed
        # The second provider sent only what was missing, not the whole model again.
        assert 0 < result.bytes_from[other.peer.peer_id] <= result.entry.size * 3 // 4
        assert sum(result.bytes_from.values()) == result.entry.size
        assert c.registry.path_of(cid).read_bytes() == path.read_bytes()


async def test_chunks_come_from_several_providers_in_parallel(tmp_path: Path) -> None:
    path, cid = big_model(tmp_path)
    async with net(tmp_path) as n:
        a = await n.start("a", (path,))
        b = await n.start("b", (path,))
        c = await n.start("c")
        await wait_providers(c, cid, 2)
        assert c.peer.models is not None
        with trio.fail_after(60):
            result = await c.peer.models.fetcher.fetch(cid)
        # 32 chunks, 16 per request: each provider's stream took a share at once.
        sent = {p: result.bytes_from.get(p, 0) for p in (a.peer.peer_id, b.peer.peer_id)}
        assert all(v > 0 for v in sent.values()), sent
        assert sum(sent.values()) == result.entry.size
        assert a.server.served_bytes + b.server.served_bytes == result.entry.size
        assert result.entry.source == "peers:" + ",".join(sorted(sent))


def corrupt(server: ModelServer) -> None:
    honest = server.read_chunk

    def flipped(f: Any, manifest: Manifest, index: int) -> bytes:
        data = bytearray(honest(f, manifest, index))
        data[len(data) // 2] ^= 0x01
        return bytes(data)

    server.read_chunk = flipped  # type: ignore[method-assign]


async def test_a_corrupt_provider_is_banned_and_the_honest_one_completes(tmp_path: Path) -> None:
    path, cid = big_model(tmp_path)
    async with net(tmp_path) as n:
        bad = await n.start("bad", (path,))
        good = await n.start("good", (path,))
        c = await n.start("c")
        corrupt(bad.server)
        await wait_providers(c, cid, 2)
        assert c.peer.models is not None
        with trio.fail_after(60):
            result = await c.peer.models.fetcher.fetch(cid)
        assert "corrupt chunk" in result.banned[bad.peer.peer_id]
        assert good.peer.peer_id not in result.banned
        assert result.bytes_from.get(bad.peer.peer_id, 0) == 0
        assert c.registry.path_of(cid).read_bytes() == path.read_bytes()


async def test_only_a_corrupt_provider_fails_cleanly(tmp_path: Path) -> None:
    path, cid = big_model(tmp_path)
    async with net(tmp_path) as n:
        bad = await n.start("bad", (path,))
        c = await n.start("c")
        corrupt(bad.server)
        await wait_providers(c, cid, 1)
        with trio.fail_after(60), pytest.raises(TransferFailed) as err:
            await c.peer.fetch_model(cid)
        line = str(err.value)
        assert "\n" not in line and "corrupt chunk" in line and "banned" in line
        assert c.store_files() == []


async def test_a_lying_manifest_is_caught_by_the_whole_file_hash(tmp_path: Path) -> None:
    real, cid = big_model(tmp_path, seed=1)
    other, _ = big_model(tmp_path, seed=2)
    async with net(tmp_path) as n:
        liar = await n.start("liar", (real,))
        c = await n.start("c")
        # Chunks that match its own manifest, but the file is not the cid's.
        fake = manifest_of_file(hashlib.sha256(other.read_bytes()).hexdigest(), other)
        fake = Manifest(cid=cid, size=fake.size, chunk_size=CHUNK_SIZE, hashes=fake.hashes)

        async def manifest(_cid: str) -> Manifest:
            return fake

        def read_chunk(_f: Any, m: Manifest, index: int) -> bytes:
            offset, length = m.span(index)
            with other.open("rb") as f:
                return os.pread(f.fileno(), length, offset)

        liar.server.manifest = manifest  # type: ignore[method-assign]
        liar.server.read_chunk = read_chunk  # type: ignore[method-assign]
        await wait_providers(c, cid, 1)
        with trio.fail_after(60), pytest.raises(TransferFailed) as err:
            await c.peer.fetch_model(cid)
        assert "manifest does not add up" in str(err.value)
        assert c.store_files() == []


async def test_a_provider_that_stops_mid_way_leaves_nothing_behind(tmp_path: Path) -> None:
    path, cid = big_model(tmp_path)
    async with net(tmp_path) as n:
        quitter = await n.start("quitter", (path,))
        c = await n.start("c")
        honest = quitter.server.read_chunk

        def truncated(f: Any, manifest: Manifest, index: int) -> bytes:
            if index >= 3:
                raise RuntimeError("the provider stops here")  # its stream just ends
            return honest(f, manifest, index)

        quitter.server.read_chunk = truncated  # type: ignore[method-assign]
        await wait_providers(c, cid, 1)
        with trio.fail_after(60), pytest.raises(TransferFailed) as err:
            await c.peer.fetch_model(cid)
        assert "closed the stream mid-transfer" in str(err.value)
        assert f"{3 * CHUNK_SIZE} bytes verified" in str(err.value)
        assert c.store_files() == []


async def test_no_provider_is_one_clear_error(tmp_path: Path) -> None:
    async with net(tmp_path) as n:
        c = await n.start("c")
        assert c.peer.models is not None
        c.peer.models.fetcher.find_timeout = 1.0
        with trio.fail_after(30), pytest.raises(NoProviders, match="no peer provides model"):
            await c.peer.fetch_model("ab" * 32)
        assert c.store_files() == []


async def test_an_oversize_model_is_refused_before_any_byte_moves(tmp_path: Path) -> None:
    path, cid = big_model(tmp_path)
    async with net(tmp_path) as n:
        a = await n.start("a", (path,))
        c = await n.start("c", limits=ModelLimits(max_model_bytes=1024 * 1024))
        await wait_providers(c, cid, 1)
        with trio.fail_after(30), pytest.raises(ModelRejected, match="above the model size limit"):
            await c.peer.fetch_model(cid)
        assert a.server.served_bytes == 0
        assert c.store_files() == []


async def test_a_model_with_custom_ops_is_refused_after_the_transfer(tmp_path: Path) -> None:
    path = models.custom_domain_model(tmp_path / "custom.onnx")
    cid = hashlib.sha256(path.read_bytes()).hexdigest()
    lax = ModelLimits(allowed_domains=ModelLimits().allowed_domains | {"com.example.custom"})
    async with net(tmp_path) as n:
        a = await n.start("a", (path,), limits=lax)  # holds it, cannot run it: not served
        c = await n.start("c")
        with trio.fail_after(20):
            await a.peer.dht.provide(provider_key(cid))
        await wait_providers(c, cid, 1)
        with trio.fail_after(30), pytest.raises(ModelRejected, match="operator domains"):
            await c.peer.fetch_model(cid)
        assert a.server.served_bytes > 0
        assert c.store_files() == []
