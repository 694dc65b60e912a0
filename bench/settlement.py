"""Benchmark: settlement (certificates, verification, convergence, spot checks).

All peers run in one trio process on 127.0.0.1 (TCP + Noise + yamux), so one
core serves every peer: a pessimistic floor for a real network.

  * verify: receipts verified per second on one core, with raw PyNaCl
    ``VerifyKey.verify`` measured in the same run as the baseline (a receipt
    carries two signatures); certificate checks; facts verified *and*
    durably stored per second through the ledger store (group commit);
  * certify: a payer pays receipts through 4 witness peers (f = 1, quorum 3)
    over ``/edgeswarm/ledger/1``; latency p50/p99 of ``pay()`` one at a time
    (each witness fsyncs its lock before voting), and certificates per second
    with several payers at once;
  * converge: 20 peers in two partitions of 10, each side holding its own
    certificates and receipts; one link heals the split; time until all 20
    ledgers report the same state hash (anti-entropy with random neighbours,
    at two sync intervals);
  * spot check: what checking one job costs on top of running it twice
    (compare outputs, digests, a referee verdict, a fraud proof check);
  * growth_checkpointed: the same facts with a checkpoint adopted every 10k facts: rows
    held at the end, adoption time, write cost and RSS (what pruning bounds);
  * growth: 1M facts (100k with --quick: receipts and the certificates that pay
    them, 1000 payers) written into one ledger store in batches of 256, as sync
    delivers them; the write cost of the first and the last tenth, and the RSS
    it took per 100k facts. Baseline in the same run: a bare SQLite insert
    committed (fsync'd) one row at a time, and 256 rows per commit.

The certify figures run the 4 witnesses each in its own process
(``results.certify.witness_processes``); payers share this process.

Prints each figure and writes bench/results/settlement.json (or --out PATH).

    python bench/settlement.py [--quick] [--out PATH] [--only growth certify ...]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import hashlib
import json
import os
import platform
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import nacl.signing
import numpy as np
import psutil
import trio

from peer.config import Config
from peer.ledger_store import open_ledger_store
from peer.node import open_peer
from peer.settlement import SettlementConfig, SettlementService, open_settlement
from protocols import signing
from protocols.certificate import Certificate, CertificateAssembler, sign_vote
from protocols.checkpoint import make_checkpoint, rule_id, sign_checkpoint
from protocols.committee import CommitteeRule
from protocols.identity import peer_id_from_public_key
from protocols.ledger import CreditPolicy, Transfer, sign_transfer
from protocols.ledger_state import FactKind, LedgerState
from protocols.proofs import FraudProof, referee_panel, sign_referee_result
from protocols.receipt import Receipt, ResultCommitment, commit, content_digest
from protocols.verification import compare_outputs, judge, outputs_digest
from protocols.witness import PersistLock, ReplyVote, Witness

RESULTS = Path(__file__).parent / "results" / "settlement.json"
CID = hashlib.sha256(b"bench-model").hexdigest()
BEACON = b"bench-beacon"
ROLE = os.environ.get("BENCH_ROLE", "peer")


class _Hardware:
    """Probe stand-in so the numbers measure settlement, not onnxruntime's import."""

    providers = ("CPUExecutionProvider",)

    def devices(self) -> list[dict[str, Any]]:
        return [{"kind": "cpu", "name": "bench cpu", "memory": 2**30}]


def key(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(hashlib.sha256(b"bench-key%d" % n).digest())


def pid(k: nacl.signing.SigningKey) -> str:
    return peer_id_from_public_key(bytes(k.verify_key))


def receipt(
    req: nacl.signing.SigningKey, ex: nacl.signing.SigningKey, price: int, job: int
) -> Receipt:
    c = commit(
        ex,
        ResultCommitment(
            job_id=hashlib.sha256(b"job%d" % job).digest()[:16],
            requester=pid(req),
            executor=pid(ex),
            model_cid=CID,
            input_digest=content_digest({"x": job}),
            output_digest=content_digest({"y": job}),
            price=price,
            compute_ms=5,
        ),
    )
    return Receipt.create(req, c)


def now_ms() -> int:
    return int(time.time() * 1000)


def certify_offline(
    witnesses: list[nacl.signing.SigningKey],
    rule: CommitteeRule,
    policy: CreditPolicy,
    payer: nacl.signing.SigningKey,
    r: Receipt,
    seq: int,
) -> Certificate:
    """A certificate from in-memory witnesses (to seed ledgers quickly)."""
    t = sign_transfer(
        payer,
        Transfer(pid(payer), r.executor, r.price, seq, r.receipt_id, now_ms()),
    )
    asm = CertificateAssembler(t, rule.committee_for(pid(payer)))
    for k in witnesses:
        w = Witness(k)
        led = _FakeLedger(rule, policy, seq)
        action = w.handle_transfer(t, r, led, t.message.time_ms)  # type: ignore[arg-type]
        if isinstance(action, PersistLock):
            action = w.lock_persisted(action.record)
        assert isinstance(action, ReplyVote), action
        cert = asm.add_vote(action.vote)
        if cert is not None:
            return cert
    raise AssertionError("no quorum")


class _FakeLedger(LedgerState):
    """A witness ledger view that trusts seqs 1..seq-1 (seeding only, not a rule change)."""

    def __init__(self, rule: CommitteeRule, policy: CreditPolicy, seq: int) -> None:
        super().__init__(rule, policy)
        self._seq = seq

    def next_seq(self, account: str) -> int:
        return self._seq

    def spendable(self, account: str, now_ms: int) -> int:
        return 0


def rate(fn: Callable[[], object], n: int) -> float:
    """Calls per second of this thread's CPU time (robust to other processes' load)."""
    t0 = time.thread_time()
    for _ in range(n):
        fn()
    return n / (time.thread_time() - t0)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# --- 1. verification rates ----------------------------------------------------------------


async def bench_verify(n: int, tmp: Path) -> dict[str, Any]:
    a, b = key(1), key(2)
    blobs = [receipt(a, b, 10, j).to_bytes() for j in range(n)]
    # Fresh objects, never verified: a verified ``Signed`` skips its checks when asked again.
    receipts = [Receipt.from_bytes(blob, verify=False) for blob in blobs]
    vk = a.verify_key
    signed = a.sign(b"x" * 200)
    # Raw verifies and receipt verifications alternate in chunks, timed by this thread's
    # CPU clock: the ratio holds on a box other processes load. Every figure below checks
    # each signature for the first time: the cache of verified signatures
    # (protocols.signing) is emptied before each one.
    signing._verified.clear()
    raw_s = receipt_s = 0.0
    for i in range(0, n, 50):
        t0 = time.thread_time()
        for _ in range(100):
            vk.verify(signed)
        t1 = time.thread_time()
        for r in receipts[i : i + 50]:
            r.verify()
        t2 = time.thread_time()
        raw_s += t1 - t0
        receipt_s += t2 - t1
    raw = 2 * n / raw_s
    receipt_verify = n / receipt_s
    signing._verified.clear()
    itb = iter(blobs * 2)
    from_bytes = rate(lambda: Receipt.from_bytes(next(itb)), n)
    witnesses = [key(100 + i) for i in range(4)]
    rule = CommitteeRule(beacon=BEACON, fallback=frozenset(pid(k) for k in witnesses))
    policy = CreditPolicy(genesis=frozenset({pid(a)}))
    certs = [certify_offline(witnesses, rule, policy, a, receipts[j], j + 1) for j in range(200)]
    certs = [Certificate.from_bytes(c.to_bytes()) for c in certs]  # fresh: never verified
    committee = rule.committee_for(pid(a))
    itc = iter(certs * (n // 100 + 2))
    signing._verified.clear()
    cert_verify = rate(lambda: next(itc).verify(committee), min(n, 200))
    signing._verified.clear()
    led = LedgerState(rule, policy)
    t0 = time.perf_counter()
    for r in receipts:
        led.ingest_bytes(FactKind.RECEIPT, r.to_bytes())
    ingest = n / (time.perf_counter() - t0)
    # Verified and durably stored, in batches (as sync delivers them) and one at a time.
    signing._verified.clear()
    async with open_ledger_store(tmp / "verify", rule, policy) as store:
        items = [(FactKind.RECEIPT, blob) for blob in blobs]
        t0 = time.perf_counter()
        for i in range(0, len(items), 256):
            await store.add_facts(items[i : i + 256])
        stored_batched = n / (time.perf_counter() - t0)
        commits_batched = store.commits
        more = [receipt(a, b, 11, n + j) for j in range(min(n, 300))]
        t0 = time.perf_counter()
        for r in more:
            await store.add(r)
        stored_single = len(more) / (time.perf_counter() - t0)
    out = {
        "raw_pynacl_verify_per_s": round(raw),
        "receipt_verify_per_s": round(receipt_verify),
        "receipt_verify_sigs_per_s": round(2 * receipt_verify),
        "receipt_parse_and_verify_per_s": round(from_bytes),
        "ledger_ingest_receipts_per_s": round(ingest),
        "certificate_verify_per_s": round(cert_verify),
        "store_verified_durable_receipts_per_s_batch256": round(stored_batched),
        "store_commits_for_batched": commits_batched,
        "store_verified_durable_receipts_per_s_one_by_one": round(stored_single),
        "receipt_vs_raw_verify": round(receipt_verify / raw, 3),
        # A receipt is 2 signatures: its verification speed per signature vs raw PyNaCl.
        "receipt_sigs_vs_raw_verify": round(2 * receipt_verify / raw, 3),
        "n": n,
    }
    return out


# --- 2. certificates over the network -----------------------------------------------------


async def open_node(
    stack: AsyncExitStack,
    tmp: Path,
    name: str,
    k: nacl.signing.SigningKey,
    rule: CommitteeRule,
    policy: CreditPolicy,
    config: SettlementConfig,
) -> Any:
    cfg = Config(data_dir=tmp / name, listen=("/ip4/127.0.0.1/tcp/0",))
    peer = await stack.enter_async_context(
        open_peer(cfg, key=k, hardware=_Hardware(), role=ROLE, settlement=False)
    )
    store = await stack.enter_async_context(open_ledger_store(cfg.data_dir, rule, policy))
    svc = await stack.enter_async_context(open_settlement(peer, store, config))
    return peer, svc


def certify_world(
    payers: int,
) -> tuple[list[nacl.signing.SigningKey], list[nacl.signing.SigningKey], Any, Any, Any]:
    """Keys, rule and policy of the certify benchmark (witness processes rebuild them)."""
    wkeys = [key(200 + i) for i in range(4)]
    pkeys = [key(300 + i) for i in range(payers)]
    rule = CommitteeRule(beacon=BEACON, fallback=frozenset(pid(k) for k in wkeys))
    policy = CreditPolicy(
        genesis=frozenset(pid(k) for k in pkeys), base_limit=10**12, max_limit=10**12
    )
    return wkeys, pkeys, key(399), rule, policy


CERTIFY_CONFIG = SettlementConfig(sync_interval=0, gossip=False, auto_pay=False)


async def witness_worker(index: int, directory: Path, payers: int) -> None:
    """One witness in its own process: prints LISTEN <addr>, runs until stdin closes."""
    wkeys, _, _, rule, policy = certify_world(payers)
    async with AsyncExitStack() as stack:
        peer, svc = await open_node(
            stack, directory, f"w{index}", wkeys[index], rule, policy, CERTIFY_CONFIG
        )
        print(f"LISTEN {peer.listen_addrs[0]}", flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        while await stdin.receive_some(1024):
            pass
        print(json.dumps({"commits": svc.store.commits, "votes": svc.stats.votes}), flush=True)


async def _read_line(stream: Any) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            raise RuntimeError(f"witness process exited early: {buf!r}")
        buf += chunk
    return buf.decode().strip()


async def bench_certify(
    sequential: int, payers: int, per_payer: int, one_by_one: int, tmp: Path
) -> dict[str, Any]:
    _, pkeys, payee, rule, policy = certify_world(payers)
    config = CERTIFY_CONFIG
    procs: list[trio.Process] = []
    async with AsyncExitStack() as stack:
        try:
            for i in range(4):
                proc = await trio.lowlevel.open_process(
                    [
                        sys.executable,
                        __file__,
                        "--witness",
                        str(i),
                        "--dir",
                        str(tmp),
                        "--payers",
                        str(payers),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
                procs.append(proc)
            addrs = []
            with trio.fail_after(120):
                for proc in procs:
                    line = await _read_line(proc.stdout)
                    assert line.startswith("LISTEN "), line
                    addrs.append(line.split()[1])
            nodes = [
                await open_node(stack, tmp, f"p{i}", k, rule, policy, config)
                for i, k in enumerate(pkeys)
            ]
            for peer, _ in nodes:
                for addr in addrs:
                    await peer.connect(addr)
            job = iter(range(10**9))
            _, first = nodes[0]
            for _ in range(5):  # warm up: streams opened, identity introduced
                await first.pay(receipt(pkeys[0], payee, 1, next(job)))
            lat = []
            for _ in range(sequential):
                r = receipt(pkeys[0], payee, 1, next(job))
                t0 = time.perf_counter()
                await first.pay(r)
                lat.append((time.perf_counter() - t0) * 1000)

            async def one_at_a_time(i: int, svc: SettlementService) -> None:
                for _ in range(one_by_one):
                    await svc.pay(receipt(pkeys[i], payee, 1, next(job)))

            watched = [psutil.Process(p.pid) for p in procs]

            def witness_cpu() -> float:
                return sum(sum(w.cpu_times()[:2]) for w in watched)

            # Before batching: each payer waits for one certificate before the next payment.
            wcpu0, cpu0 = witness_cpu(), time.process_time()
            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i, (_, svc) in enumerate(nodes):
                    nursery.start_soon(one_at_a_time, i, svc)
            one_elapsed = time.perf_counter() - t0
            one_wcpu, one_cpu = witness_cpu() - wcpu0, time.process_time() - cpu0

            # Every payer owes per_payer receipts at once (a busy requester): pay() calls
            # that arrive while a batch is in flight are certified together in the next.
            owed = [[receipt(k, payee, 1, next(job)) for _ in range(per_payer)] for k in pkeys]
            conc_lat: list[float] = []

            async def pay_timed(svc: SettlementService, r: Receipt) -> None:
                t0 = time.perf_counter()
                await svc.pay(r)
                conc_lat.append((time.perf_counter() - t0) * 1000)

            wcpu0, cpu0 = witness_cpu(), time.process_time()
            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i, (_, svc) in enumerate(nodes):
                    for r in owed[i]:
                        nursery.start_soon(pay_timed, svc, r)
            elapsed = time.perf_counter() - t0
            payer_cpu = time.process_time() - cpu0
            wcpu = witness_cpu() - wcpu0
            total = payers * per_payer
            witness_stats = []
            for proc in procs:
                assert proc.stdin is not None
                await proc.stdin.aclose()
            with trio.fail_after(60):
                for proc in procs:
                    witness_stats.append(json.loads(await _read_line(proc.stdout)))
                    await proc.wait()
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                with trio.move_on_after(10):
                    await proc.wait()
    commits = sum(w["commits"] for w in witness_stats)
    return {
        "witnesses": 4,
        "quorum": 3,
        "witness_processes": True,
        "sequential": {
            "n": sequential,
            "p50_ms": round(statistics.median(lat), 2),
            "p99_ms": round(pct(lat, 0.99), 2),
            "mean_ms": round(statistics.fmean(lat), 2),
            "certs_per_s": round(1000 / statistics.fmean(lat), 1),
        },
        "one_in_flight_per_payer": {
            "payers": payers,
            "n": payers * one_by_one,
            "certs_per_s": round(payers * one_by_one / one_elapsed, 1),
            "payer_process_cpu_ms_per_cert": round(1000 * one_cpu / (payers * one_by_one), 2),
            # CPU of the 4 witness processes together (psutil, user + system).
            "witness_cpu_ms_per_cert": round(1000 * one_wcpu / (payers * one_by_one), 2),
        },
        "concurrent": {
            "payers": payers,
            "n": total,
            "receipts_owed_per_payer": per_payer,
            "certs_per_s": round(total / elapsed, 1),
            # From pay() to its certificate, every receipt owed at t0 (so queueing included).
            "p50_ms": round(statistics.median(conc_lat), 2),
            "p99_ms": round(pct(conc_lat, 0.99), 2),
            "payer_process_cpu_ms_per_cert": round(1000 * payer_cpu / total, 2),
            "witness_cpu_ms_per_cert": round(1000 * wcpu / total, 2),
            # All witness commits of the run (warm-up and sequential included) per vote.
            "witness_commits_per_vote": round(
                commits / max(1, sum(w["votes"] for w in witness_stats)), 2
            ),
        },
    }


# --- 3. convergence after a partition heals ----------------------------------------------


async def bench_converge(
    n_peers: int, facts_per_side: int, interval: float, tmp: Path, trial: int
) -> dict[str, Any]:
    wkeys = [key(500 + i) for i in range(4)]
    rule = CommitteeRule(beacon=BEACON, fallback=frozenset(pid(k) for k in wkeys))
    payer_a, payer_b, payee = key(600), key(601), key(602)
    node_keys = [key(700 + 100 * trial + i) for i in range(n_peers)]
    # Genesis accounts need no identity proof, so the two sides start with exactly their facts.
    genesis = frozenset({pid(payer_a), pid(payer_b), *(pid(k) for k in node_keys)})
    policy = CreditPolicy(genesis=genesis, base_limit=10**12, max_limit=10**12)
    sides: list[list[tuple[FactKind, bytes]]] = []
    for payer, base in ((payer_a, 0), (payer_b, 10**6)):
        items: list[tuple[FactKind, bytes]] = []
        for j in range(facts_per_side // 2):
            r = receipt(payer, payee, 1, base + j + trial * 10**7)
            c = certify_offline(wkeys, rule, policy, payer, r, j + 1)
            items += [(FactKind.RECEIPT, r.to_bytes()), (FactKind.CERTIFICATE, c.to_bytes())]
        sides.append(items)
    config = SettlementConfig(sync_interval=interval, gossip=True, auto_pay=False)
    half = n_peers // 2
    async with AsyncExitStack() as stack:
        nodes = [
            await open_node(stack, tmp, f"c{trial}-{i}", k, rule, policy, config)
            for i, k in enumerate(node_keys)
        ]
        groups = [nodes[:half], nodes[half:]]
        rng = random.Random(trial)
        for g, items in zip(groups, sides, strict=True):
            for i, (peer, svc) in enumerate(g):
                await svc.add_facts(items)  # as if the side had already synced internally
                # ring + one random chord: every peer has 2-4 neighbours
                await peer.connect(g[(i + 1) % len(g)][0].listen_addrs[0])
                other = rng.randrange(len(g))
                if other not in (i, (i + 1) % len(g)):
                    await peer.connect(g[other][0].listen_addrs[0])
        target = {s.state_hash() for _, s in nodes}
        assert len(target) == 2, [(len(s.ledger), s.state_hash().hex()[:8]) for _, s in nodes]
        t0, cpu0 = time.perf_counter(), time.process_time()
        await groups[0][0][0].connect(groups[1][0][0].listen_addrs[0])  # heal: one link
        with trio.fail_after(300):
            for _, svc in nodes:  # event-driven: wakes whenever a fact lands on that peer
                await svc.wait_until(lambda svc=svc: len(svc.ledger) == 2 * facts_per_side)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        assert len({s.state_hash() for _, s in nodes}) == 1
        syncs = sum(s.stats.syncs for _, s in nodes)
        return {
            "peers": n_peers,
            "facts_per_side": facts_per_side,
            "sync_interval_s": interval,
            "converge_s": round(elapsed, 2),
            "in_sync_intervals": round(elapsed / interval, 1),
            "sync_sessions": syncs,
            # All 20 peers share this process: CPU (mostly signature checks of the
            # 2 x facts_per_side facts each peer verifies) bounds the time here.
            "process_cpu_s": round(cpu, 2),
        }


# --- 4. spot check ------------------------------------------------------------------------


def bench_spot_check(n: int) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    emb = {"embedding": rng.standard_normal((1, 384)).astype(np.float32)}
    emb2 = {"embedding": emb["embedding"] * (1 + 1e-6)}
    logits = {"logits": rng.standard_normal((1, 1000)).astype(np.float32)}
    cmp_emb = rate(lambda: compare_outputs(emb, emb2), n)
    cmp_logits = rate(lambda: compare_outputs(logits, logits), n)
    dig = rate(lambda: outputs_digest(emb), n)
    ex, req, refs = key(900), key(901), [key(902 + i) for i in range(3)]
    c = commit(
        ex,
        ResultCommitment(
            job_id=b"j" * 16,
            requester=pid(req),
            executor=pid(ex),
            model_cid=CID,
            input_digest=content_digest({"x": 1}),
            output_digest=outputs_digest(emb),
            price=1,
            compute_ms=5,
        ),
    )

    def referee() -> object:
        verdict = judge(c.message, emb, emb2)
        return sign_referee_result(
            refs[0], c, output_digest=outputs_digest(emb2), verdict=verdict, time_ms=1
        )

    jud = rate(referee, min(n, 2000))
    rule = CommitteeRule(
        beacon=BEACON, fallback=frozenset(pid(k) for k in refs), referee_panel_size=3
    )
    panel = referee_panel(rule, c, 0)
    results = tuple(
        sign_referee_result(
            k, c, output_digest=content_digest({"y": 2}), verdict="mismatch", time_ms=1
        )
        for k in refs
        if pid(k) in panel
    )
    proof = FraudProof.of(c, results)
    # A fresh object per check (a verified ``Signed`` skips its checks when asked again);
    # its signatures are in the cache of verified signatures after the first, as before.
    proofs = iter([FraudProof.from_bytes(proof.to_bytes()) for _ in range(min(n, 2000))])
    fraud = rate(lambda: next(proofs).verify(panel), min(n, 2000))
    return {
        "compare_minilm_384_float32_us": round(1e6 / cmp_emb, 1),
        "compare_1000_logits_float32_us": round(1e6 / cmp_logits, 1),
        "outputs_digest_384_float32_us": round(1e6 / dig, 1),
        "referee_judge_and_sign_us": round(1e6 / jud, 1),
        "fraud_proof_verify_us": round(1e6 / fraud, 1),
    }


# --- 5. growth: cost per write and memory as the ledger grows -------------------------------


def sqlite_baseline(tmp: Path, single: int, batches: int) -> dict[str, Any]:
    """A bare SQLite table like ``facts``: inserts committed (fsync'd) one by one, and 256
    rows per commit; WAL with synchronous=FULL, as the ledger store."""
    path = tmp / "bare.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE facts (id BLOB PRIMARY KEY, kind INTEGER, data BLOB) WITHOUT ROWID")
    blob = os.urandom(600)
    n = 0

    def row() -> tuple[bytes, int, bytes]:
        nonlocal n
        n += 1
        return hashlib.sha256(b"%d" % n).digest(), 1, blob

    t0 = time.perf_counter()
    for _ in range(single):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO facts VALUES (?, ?, ?)", row())
        conn.execute("COMMIT")
    one = single / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(batches):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO facts VALUES (?, ?, ?)", [row() for _ in range(256)])
        conn.execute("COMMIT")
    batched = batches * 256 / (time.perf_counter() - t0)
    conn.close()
    return {
        "fsync_inserts_per_s_one_per_commit": round(one),
        "fsync_inserts_per_s_256_per_commit": round(batched),
    }


def growth_batches(total: int, batch: int = 256) -> Any:
    """Receipts and the certificates that pay them (1000 payers, 1000 payees, a committee of
    one witness), as wire items, ``batch`` facts at a time; generated as they are used."""
    wkey = key(4000)
    payers = [key(5000 + i) for i in range(1000)]
    payees = [key(6000 + i) for i in range(1000)]
    seqs = [0] * len(payers)
    t_base = now_ms()
    j = 0
    while j * 2 < total:
        items: list[tuple[FactKind, bytes]] = []
        while len(items) < batch and j * 2 < total:
            p = j % len(payers)
            r = receipt(payers[p], payees[(j // len(payers)) % len(payees)], 1 + j % 7, 10**8 + j)
            seqs[p] += 1
            t = sign_transfer(
                payers[p],
                Transfer(pid(payers[p]), r.executor, r.price, seqs[p], r.receipt_id, t_base + j),
            )
            cert = Certificate(t, (sign_vote(wkey, t),))
            items += [(FactKind.RECEIPT, r.to_bytes()), (FactKind.CERTIFICATE, cert.to_bytes())]
            j += 1
        yield items


async def bench_growth(total: int, tmp: Path) -> dict[str, Any]:
    wkey = key(4000)
    rule = CommitteeRule(beacon=BEACON, fallback=frozenset({pid(wkey)}), f=0)
    payers = frozenset(pid(key(5000 + i)) for i in range(1000))
    policy = CreditPolicy(genesis=payers, base_limit=10**12, max_limit=10**12)
    proc = psutil.Process()
    times: list[tuple[int, float, float]] = []  # (facts in the batch, CPU s, wall s)
    async with open_ledger_store(tmp / "growth", rule, policy) as store:
        gc_was = gc.isenabled()
        gc.collect()
        rss0 = proc.memory_info().rss
        done = 0
        next_report = total // 10
        for items in growth_batches(total):
            c0, t0 = time.process_time(), time.perf_counter()
            results = await store.add_facts(items)
            times.append((len(items), time.process_time() - c0, time.perf_counter() - t0))
            bad = [r for r in results if r is not True]
            assert not bad, bad[:3]
            done += len(items)
            if done >= next_report:  # one line per tenth: a cut-short run still says much
                recent = times[-max(1, (total // 10) // 256) :]
                n_recent = sum(r[0] for r in recent)
                progress = {
                    "growth_facts": done,
                    "rss_mb": round(proc.memory_info().rss / 2**20, 1),
                    "write_us_this_tenth": round(1e6 * sum(r[1] for r in recent) / n_recent, 1),
                    "write_wall_us_this_tenth": round(
                        1e6 * sum(r[2] for r in recent) / n_recent, 1
                    ),
                    "loadavg_1m": round(os.getloadavg()[0], 2),
                }
                print(json.dumps(progress), flush=True)
                next_report += total // 10
        gc.collect()
        rss1 = proc.memory_info().rss
        assert len(store.ledger) == total, len(store.ledger)
        commits = store.commits
        if not gc_was:
            gc.disable()

    def decile_us(which: int, column: int) -> float:
        lo, hi = which * total // 10, (which + 1) * total // 10
        seen = facts = 0
        secs = 0.0
        for row in times:
            if lo <= seen < hi:
                secs += row[column]
                facts += row[0]
            seen += row[0]
        return round(1e6 * secs / facts, 1)

    # Write cost = CPU time of this process (event loop + aiosqlite's thread) per fact:
    # parse, verify, ingest, commit. Wall time is also given; on a shared box it mostly
    # measures the other processes.
    cpu = [decile_us(d, 1) for d in range(10)]
    wall = [decile_us(d, 2) for d in range(10)]
    return {
        "facts": total,
        "batch": 256,
        "commits": commits,
        "write_us_first_decile": cpu[0],
        "write_us_last_decile": cpu[-1],
        "write_us_by_decile": cpu,
        "last_over_first": round(cpu[-1] / cpu[0], 3),
        "write_wall_us_by_decile": wall,
        "write_wall_last_over_first": round(wall[-1] / wall[0], 3),
        "write_us_means": "process CPU time per fact (parse + verify + ingest + fsync'd commit)",
        "rss_mb_per_100k_facts": round((rss1 - rss0) / 2**20 / (total / 100_000), 2),
        "rss_mb_growth": round((rss1 - rss0) / 2**20, 1),
    }


async def bench_growth_checkpointed(total: int, every: int, tmp: Path) -> dict[str, Any]:
    """``growth``'s facts into one ledger, with a checkpoint (signed by the one witness)
    adopted after every ``every`` facts: rows, memory and write cost stay bounded."""
    wkey = key(4000)
    rule = CommitteeRule(beacon=BEACON, fallback=frozenset({pid(wkey)}), f=0)
    payers = frozenset(pid(key(5000 + i)) for i in range(1000))
    policy = CreditPolicy(genesis=payers, base_limit=10**12, max_limit=10**12)
    proc = psutil.Process()
    write_cpu: list[tuple[int, float]] = []
    adopt_ms: list[float] = []
    stall_ms: list[float] = []  # longest event-loop stall during each adoption
    rss_after: list[float] = []  # RSS growth (MB) after each checkpoint: a plateau = bounded
    async with open_ledger_store(tmp / "growth-cp", rule, policy) as store:
        gc.collect()
        rss0 = proc.memory_info().rss
        done = since = 0
        for items in growth_batches(total):
            c0 = time.process_time()
            results = await store.add_facts(items)
            write_cpu.append((len(items), time.process_time() - c0))
            assert all(r is True for r in results)
            done += len(items)
            since += len(items)
            if since >= every:
                since = 0
                header, _ = store.ledger.checkpoint_draft(now_ms() + 10**9, rule_id(rule))
                cp = make_checkpoint(header, [sign_checkpoint(wkey, header)])
                gaps: list[float] = []
                adopted = trio.Event()

                async def tick(gaps: list[float] = gaps, adopted: trio.Event = adopted) -> None:
                    # How long the event loop is kept from other tasks while adopting.
                    last = time.perf_counter()
                    while not adopted.is_set():
                        await trio.sleep(0.002)
                        now = time.perf_counter()
                        gaps.append(now - last)
                        last = now

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(tick)
                    t0 = time.perf_counter()
                    await store.adopt_checkpoint(cp)
                    adopt_ms.append((time.perf_counter() - t0) * 1000)
                    adopted.set()
                stall_ms.append(1000 * max(gaps, default=0.0))
                rss_after.append(round((proc.memory_info().rss - rss0) / 2**20, 1))
        gc.collect()
        rss1 = proc.memory_info().rss
        rows = store.fact_count()
        held = len(store.ledger)
        accounts = len(store.ledger.checkpoint_accounts())

    def tenth_us(which: int) -> float:
        lo, hi = which * len(write_cpu) // 10, (which + 1) * len(write_cpu) // 10
        part = write_cpu[lo:hi]
        return round(1e6 * sum(c for _, c in part) / max(1, sum(n for n, _ in part)), 1)

    return {
        "facts": total,
        "checkpoint_every": every,
        "checkpoints": len(adopt_ms),
        "rows_at_end": rows,
        "facts_held_at_end": held,
        "accounts": accounts,
        "adopt_ms_p50": round(statistics.median(adopt_ms), 1) if adopt_ms else None,
        "adopt_ms_max": round(max(adopt_ms), 1) if adopt_ms else None,
        # The longest time other tasks waited for the event loop during an adoption.
        "adopt_loop_stall_ms_p50": round(statistics.median(stall_ms), 1) if stall_ms else None,
        "adopt_loop_stall_ms_max": round(max(stall_ms), 1) if stall_ms else None,
        "write_us_first_decile": tenth_us(0),
        "write_us_last_decile": tenth_us(9),
        "rss_mb_per_100k_facts": round((rss1 - rss0) / 2**20 / (total / 100_000), 2),
        "rss_mb_growth_after_each_checkpoint": rss_after,
    }


SECTIONS = ("growth", "verify", "certify", "converge", "spot_check", "growth_checkpointed")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    only = set(args.only or SECTIONS)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "growth" in only:  # first: the process is still small, so RSS growth is the ledger's
            print("growth ...", flush=True)
            results["growth"] = await bench_growth(100_000 if args.quick else 1_000_000, tmp)
            results["growth"]["baseline_sqlite"] = sqlite_baseline(tmp, 200, 40)
            print(json.dumps(results["growth"], indent=1), flush=True)
        if "growth_checkpointed" in only:
            print("growth with checkpoints ...", flush=True)
            results["growth_checkpointed"] = await bench_growth_checkpointed(
                args.growth_facts or (100_000 if args.quick else 1_000_000), 10_000, tmp
            )
            print(json.dumps(results["growth_checkpointed"], indent=1), flush=True)
        if "verify" in only:
            print("verify ...", flush=True)
            results["verify"] = await bench_verify(1000 if args.quick else 4000, tmp)
            print(json.dumps(results["verify"], indent=1), flush=True)
        if "certify" in only:
            print("certify ...", flush=True)
            results["certify"] = await bench_certify(
                50 if args.quick else 300,
                4 if args.quick else 8,
                200 if args.quick else 500,
                10 if args.quick else 40,
                tmp,
            )
            print(json.dumps(results["certify"], indent=1), flush=True)
        if "converge" in only:
            print("converge ...", flush=True)
            conv = []
            for trial, interval in enumerate([1.0, 0.25] if not args.quick else [0.5]):
                conv.append(
                    await bench_converge(20, 100 if args.quick else 400, interval, tmp, trial)
                )
                print(json.dumps(conv[-1], indent=1), flush=True)
            results["converge"] = conv
    if "spot_check" in only:
        print("spot check ...", flush=True)
        results["spot_check"] = bench_spot_check(2000 if args.quick else 10000)
        print(json.dumps(results["spot_check"], indent=1), flush=True)
    return results


LOAD_AT_START = round(os.getloadavg()[0], 2)


@contextlib.contextmanager
def _profiled(name: str) -> Iterator[None]:
    """With BENCH_PROFILE=DIR, write a cProfile of this process to DIR/NAME.prof."""
    where = os.environ.get("BENCH_PROFILE")
    if not where:
        yield
        return
    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        prof.dump_stats(str(Path(where) / f"{name}.prof"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument(
        "--growth-facts", type=int, help="facts for growth_checkpointed (default 100k/1M)"
    )
    # Internal: one witness of the certify benchmark, in its own process.
    parser.add_argument("--witness", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--payers", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.witness is not None:
        with _profiled(f"witness{args.witness}"):
            trio.run(witness_worker, args.witness, args.dir, args.payers)
        return
    with _profiled("main"):
        results = trio.run(main_async, args)
    doc = {
        "bench": "settlement",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "cpu": platform.machine(),
            "rss_mb_at_end": round(psutil.Process().memory_info().rss / 2**20, 1),
            # Other processes share this box: the load average says how much CPU we had.
            "loadavg_1m_start_end": [LOAD_AT_START, round(os.getloadavg()[0], 2)],
        },
        "setup": {
            "transport": "TCP + Noise + yamux on 127.0.0.1; certify: 4 witness processes, "
            "payers in this process; converge: all peers in this process",
            "sqlite": "WAL, synchronous=FULL (fsync per commit), group commit",
            "quick": args.quick,
            "argv": sys.argv[1:],
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
