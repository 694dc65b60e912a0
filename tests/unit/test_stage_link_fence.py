"""A route that changes a stage's upstream fences the old one off (``StageLinks``): a forward
from the old upstream is either taken before the route (and the route's answer reports its
signed output, ``StageReply.taken``) or refused after it. That is what lets a requester
taking over a lost stage executor start its replacement after the jobs the lost one had
forwarded on already (``protocols.pipeline.answered_downstream``), so that the next stage
never gets a job twice. In-process, with a fake executor and stream: deterministic."""

from __future__ import annotations

from dataclasses import dataclass, field

import nacl.signing
import trio
import trio.testing

from peer.market.stage_link import StageLinks
from protocols.identity import peer_id_from_public_key
from protocols.market import JobInput
from protocols.pipeline import StageForward, StageOutput, StagePayload, StageRoute
from protocols.receipt import content_digest
from protocols.signed import Signed, sign_message


def key(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(bytes([n]) * 32)


def pid(n: int) -> str:
    return peer_id_from_public_key(bytes(key(n).verify_key))


REQ, OLD, ME, NEW = pid(1), pid(2), pid(3), pid(4)
J1, J2 = b"\x01" * 16, b"\x02" * 16
WIRE = {"h": {"dtype": "uint8", "shape": [4], "data": b"\0" * 4}}


def route(upstream: str) -> StageRoute:
    return StageRoute(
        job_id=J2,
        requester=REQ,
        executor=ME,
        upstream=upstream,
        upstream_job=J1,
        downstream="",
        downstream_job=b"",
        expires=1e9,
    )


def forward(sender: int, seq: int) -> StageForward:
    out = StageOutput(
        job_id=J1,
        seq=seq,
        requester=REQ,
        executor=pid(sender),
        output_digest=content_digest(WIRE),
        to_job=J2,
        to_seq=seq,
    )
    return StageForward(J2, J1, seq, 4, sign_message(key(sender), out))


@dataclass
class Award:
    requester: str = REQ
    executor: str = ME
    deadline: float = 1e9


@dataclass
class Session:
    award: Award = field(default_factory=Award)
    route: StageRoute | None = None
    route_set: trio.Event = field(default_factory=trio.Event)
    forward_lock: trio.Lock = field(default_factory=trio.Lock)


@dataclass
class Limits:
    max_total_bytes: int = 1 << 20


class Executor:
    def __init__(self, session: Session) -> None:
        self.sessions = {J2: session}
        self.limits = Limits()
        self.max_frame = 1 << 20
        self.fed: list[int] = []

    async def forwarded_input(self, s: Session, item: JobInput) -> None:
        self.fed.append(item.seq)


class Stream:
    """A stage stream from ``sender`` whose payload arrives once ``release`` is set."""

    def __init__(self, sender: str) -> None:
        self.remote_peer = sender
        self.reading = trio.Event()
        self.release = trio.Event()

    def set_max_frame(self, max_frame: int) -> None:
        pass

    async def receive(self) -> StagePayload:
        self.reading.set()
        await self.release.wait()
        return StagePayload(WIRE)


def setup() -> tuple[StageLinks, Executor]:
    sl = StageLinks(host=None, dialer=None, clock=lambda: 0.0)
    session = Session(route=route(OLD))
    session.route_set.set()
    ex = Executor(session)
    sl.executor = ex  # type: ignore[assignment]
    return sl, ex


async def test_a_forward_read_while_a_new_route_arrives_is_reported_by_that_route() -> None:
    sl, ex = setup()
    ss = Stream(OLD)
    taken: list[Signed[StageOutput]] = []
    whys: dict[str, str] = {}

    async def fwd() -> None:
        whys["fwd"] = await sl._take_forward(forward(2, 5), ss)  # type: ignore[arg-type]

    async def rt() -> None:
        whys["route"] = await sl._take_route(route(NEW), REQ, taken)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fwd)
            await ss.reading.wait()  # checked against the old route, payload being read
            nursery.start_soon(rt)
            await trio.testing.wait_all_tasks_blocked()
            assert "route" not in whys  # the route waits for the forward in progress
            ss.release.set()
    assert whys == {"fwd": "", "route": ""}
    assert [o.message.seq for o in taken] == [5] and ex.fed == [5]
    # From now on the old upstream is refused: it cannot deliver a job the new one runs.
    late = Stream(OLD)
    late.release.set()
    with trio.fail_after(10):
        why = await sl._take_forward(forward(2, 6), late)  # type: ignore[arg-type]
    assert "requester named" in why and ex.fed == [5]
    new = Stream(NEW)
    new.release.set()
    with trio.fail_after(10):
        assert await sl._take_forward(forward(4, 6), new) == ""  # type: ignore[arg-type]
    assert ex.fed == [5, 6]


async def test_a_route_that_keeps_the_upstream_reports_nothing() -> None:
    sl, ex = setup()
    ss = Stream(OLD)
    ss.release.set()
    with trio.fail_after(10):
        assert await sl._take_forward(forward(2, 0), ss) == ""  # type: ignore[arg-type]
        taken: list[Signed[StageOutput]] = []
        assert await sl._take_route(route(OLD), REQ, taken) == ""
    assert taken == [] and ex.fed == [0]
    assert [o.message.seq for o in sl.taken(J2)] == [0]


# --- the requester's side: the replacement starts after the jobs the lost one delivered ---


class Links:
    def __init__(self, taken: tuple[Signed[StageOutput], ...]) -> None:
        self.taken = taken
        self.routes: list[StageRoute] = []

    async def route_taken(
        self, executor: str, route: Signed[StageRoute], until: float
    ) -> tuple[str, tuple[Signed[StageOutput], ...]]:
        self.routes.append(route.message)
        return "", self.taken


@dataclass
class StageJob:
    job_id: bytes


class FakeStreamer:
    def __init__(self) -> None:
        self.stages = [StageJob(J1), StageJob(J2)]
        self.base = [0, 0]
        self.until = 1e9
        self.via_requester: frozenset[int] = frozenset()

    def _route(self, k: int) -> StageRoute:
        assert k == 1
        return route(NEW)


@dataclass
class Market:
    links: Links
    key: nacl.signing.SigningKey = field(default_factory=lambda: key(1))
    peer_id: str = REQ


@dataclass
class Entry:
    name: str = "p"


@dataclass
class Lost:
    executor: str = OLD


async def test_a_take_over_starts_after_the_jobs_the_lost_executor_forwarded_on() -> None:
    """Stage 1's executor OLD forwarded jobs 0-3 to stage 2 but its answers to jobs 2 and 3
    never reached the requester: its replacement starts at job 4, and jobs 2 and 3 go on
    as answered with OLD's signed output digests (what stage 2 ran on)."""
    from peer.market.pipeline import PipelineLease

    taken = tuple(forward(2, n).output for n in range(4))
    links = Links(taken)
    lease = PipelineLease(Market(links), Entry(), FakeStreamer())  # type: ignore[arg-type]
    lease._next[0] = 5
    with trio.fail_after(10):
        n0 = await lease._point_next_stage(0, Lost(), 2)  # type: ignore[arg-type]
    assert n0 == 4 and [r.upstream for r in links.routes] == [NEW]
    for n in (2, 3):
        w = lease._waiters[0][n]
        assert w.done.is_set() and w.forwarded == content_digest(WIRE) and not w.lost
    assert [o.message.seq for o in lease.delivered] == [2, 3]
    # Nothing the lost executor did not sign itself moves the start.
    links.taken = tuple(forward(4, n).output for n in range(4))
    lease = PipelineLease(Market(links), Entry(), FakeStreamer())  # type: ignore[arg-type]
    lease._next[0] = 5
    with trio.fail_after(10):
        assert await lease._point_next_stage(0, Lost(), 2) == 2  # type: ignore[arg-type]
    assert lease._waiters[0] == {} and lease.delivered == []
