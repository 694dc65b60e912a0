"""The ``/edgeswarm/ledger/1`` wire: typed requests and replies, sans-IO.

Each frame is ``uvarint(len) || canonical CBOR`` (``protocols.codec``), at most
``MAX_FRAME`` bytes. Requests are ``{"v": 1, "op": ..., ...}``, one reply frame per
request, many requests per stream:

=========  ===========================  ==================================
op         request fields               reply fields
=========  ===========================  ==================================
certify    ``req``: TransferRequest     ``r``: witness reply (vote/refusal/proof)
certify_   ``reqs``: [TransferRequest]  ``rs``: [witness reply bytes, or an error
many       (1..MAX_BATCH, in seq          string for a member that could not be
           order; one lock fsync for      read: it spoils no other member)]
           all)
push       ``items``: [ledger item]     ``new``, ``bad``: counts
sync       ``m``: reconcile message     ``m``: reply message or null
get        ``ids``: [32-byte fact id]   ``items``: [ledger item]
ckpt       ``p``: page number           ``cp``: adopted checkpoint or null,
                                        ``acc``: its account rows (one page),
                                        ``pages``: how many pages
ckpt_sign  ``h``: checkpoint header     ``vote``: the member's signed vote
=========  ===========================  ==================================

An error reply is ``{"v": 1, "err": "what was expected and what came"}``.

``decode_request`` / ``decode_reply`` take the decoded CBOR value (untrusted) and
return one of the frozen dataclasses below or raise ``ValidationError``;
``to_wire()`` gives the plain value to encode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from protocols.checkpoint import (
    ACCOUNTS_PAGE,
    AccountSummary,
    Checkpoint,
    CheckpointHeader,
    CheckpointVote,
    decode_accounts,
    encode_accounts,
)
from protocols.errors import ValidationError
from protocols.reconcile import ID_SIZE

VERSION = 1
MAX_FRAME = 1 << 20
# Items in one push/get, and bytes of items packed into one frame (room for the envelope).
MAX_ITEMS = 512
MAX_ITEM_PAYLOAD = MAX_FRAME - 64 * 1024
MAX_ERROR = 400
OPS = ("certify", "certify_many", "push", "sync", "get", "ckpt", "ckpt_sign")
# Transfer requests in one certify_many (a payer's pipelined seqs; see protocols.witness).
MAX_BATCH = 64
MAX_PAGES = 1 << 12


def _check_message(raw: object, what: str) -> dict[Any, Any]:
    if not isinstance(raw, dict):
        raise ValidationError(f"{what} must be a CBOR map, got {type(raw).__name__}")
    if raw.get("v") != VERSION:
        raise ValidationError(f"{what} version must be {VERSION}, got {raw.get('v')!r}")
    return raw


def _bytes_list(value: object, what: str, op: str, *, size: int | None = None) -> tuple[bytes, ...]:
    if type(value) is not list or len(value) > MAX_ITEMS:
        raise ValidationError(f"{op} needs '{what}': a list of at most {MAX_ITEMS}")
    for v in value:
        if type(v) is not bytes:
            raise ValidationError(f"{op}: every one of '{what}' must be bytes")
        if size is not None and len(v) != size:
            raise ValidationError(f"fact ids are {size} bytes")
    return tuple(value)


def _count(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_ITEMS:
        raise ValidationError(f"'{what}' must be a count of 0..{MAX_ITEMS}, got {value!r}")
    return value


# --- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certify:
    """Ask a witness to vote for a transfer (``req``: encoded ``TransferRequest``)."""

    req: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"v": VERSION, "op": "certify", "req": self.req}


@dataclass(frozen=True)
class CertifyMany:
    """Ask a witness to vote for several transfers (encoded ``TransferRequest``s), decided
    in order and locked with one fsync. Each member is answered on its own."""

    reqs: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.reqs) <= MAX_BATCH:
            raise ValidationError(f"certify_many carries 1..{MAX_BATCH} requests")

    def to_wire(self) -> dict[str, Any]:
        return {"v": VERSION, "op": "certify_many", "reqs": list(self.reqs)}


@dataclass(frozen=True)
class Push:
    """Facts sent to a peer (encoded ledger items)."""

    items: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if len(self.items) > MAX_ITEMS:
            raise ValidationError(f"a push carries at most {MAX_ITEMS} items")

    def to_wire(self) -> dict[str, Any]:
        return {"v": VERSION, "op": "push", "items": list(self.items)}


@dataclass(frozen=True)
class Sync:
    """One round of range-based reconciliation (``protocols.reconcile``)."""

    m: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"v": VERSION, "op": "sync", "m": self.m}


@dataclass(frozen=True)
class Get:
    """Fetch facts by id."""

    ids: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if len(self.ids) > MAX_ITEMS:
            raise ValidationError(f"a get asks for at most {MAX_ITEMS} ids")

    def to_wire(self) -> dict[str, Any]:
        return {"v": VERSION, "op": "get", "ids": list(self.ids)}


@dataclass(frozen=True)
class GetCheckpoint:
    """The peer's adopted checkpoint and one page of its account rows."""

    page: int

    def __post_init__(self) -> None:
        if type(self.page) is not int or not 0 <= self.page < MAX_PAGES:
            raise ValidationError(f"ckpt needs 'p': a page number of 0..{MAX_PAGES - 1}")

    def to_wire(self) -> dict[str, Any]:
        return {"v": VERSION, "op": "ckpt", "p": self.page}


@dataclass(frozen=True)
class SignCheckpoint:
    """Ask a member of a checkpoint committee to vote for a header (it signs only a header
    it computes itself from its own facts)."""

    header: CheckpointHeader

    def to_wire(self) -> dict[str, Any]:
        return {"v": VERSION, "op": "ckpt_sign", "h": self.header.to_body()}


Request = Certify | CertifyMany | Push | Sync | Get | GetCheckpoint | SignCheckpoint


def decode_request(raw: object) -> Request:
    """A request from a peer (the decoded CBOR value), validated."""
    req = _check_message(raw, "request")
    op = req.get("op")
    if op == "certify":
        body = req.get("req")
        if type(body) is not bytes:
            raise ValidationError("certify needs 'req': TransferRequest bytes")
        return Certify(body)
    if op == "certify_many":
        reqs = req.get("reqs")
        if type(reqs) is not list or not 1 <= len(reqs) <= MAX_BATCH:
            raise ValidationError(f"certify_many needs 'reqs': a list of 1..{MAX_BATCH}")
        if any(type(r) is not bytes for r in reqs):
            raise ValidationError("certify_many: every one of 'reqs' must be bytes")
        return CertifyMany(tuple(reqs))
    if op == "push":
        return Push(_bytes_list(req.get("items"), "items", "push"))
    if op == "sync":
        m = req.get("m")
        if type(m) is not bytes:
            raise ValidationError("sync needs 'm': reconcile message bytes")
        return Sync(m)
    if op == "get":
        return Get(_bytes_list(req.get("ids"), "ids", "get", size=ID_SIZE))
    if op == "ckpt":
        return GetCheckpoint(req.get("p"))  # type: ignore[arg-type]
    if op == "ckpt_sign":
        return SignCheckpoint(CheckpointHeader.from_body(req.get("h")))
    raise ValidationError(f"unknown op {op!r}, expected one of {', '.join(OPS)}")


# --- replies -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertifyReply:
    r: bytes  # encoded witness reply (protocols.witness.decode_reply)

    def to_wire(self) -> dict[str, Any]:
        return {"v": VERSION, "r": self.r}

    @classmethod
    def from_wire(cls, reply: dict[Any, Any]) -> CertifyReply:
        r = reply.get("r")
        if type(r) is not bytes:
            raise ValidationError("certify reply without 'r' bytes")
        return cls(r)


@dataclass(frozen=True)
class CertifyManyReply:
    """One answer per member, in order: witness reply bytes, or why it could not be read."""

    rs: tuple[bytes | str, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"v": VERSION, "rs": [r if isinstance(r, bytes) else r[:MAX_ERROR] for r in self.rs]}

    @classmethod
    def from_wire(cls, reply: dict[Any, Any]) -> CertifyManyReply:
        rs = reply.get("rs")
        if type(rs) is not list or not 1 <= len(rs) <= MAX_BATCH:
            raise ValidationError(f"certify_many reply needs 'rs': a list of 1..{MAX_BATCH}")
        for r in rs:
            if type(r) is not bytes and (type(r) is not str or len(r) > MAX_ERROR):
                raise ValidationError("certify_many reply: each answer is bytes or an error")
        return cls(tuple(rs))


@dataclass(frozen=True)
class PushReply:
    new: int
    bad: int

    def to_wire(self) -> dict[str, Any]:
        return {"v": VERSION, "new": self.new, "bad": self.bad}

    @classmethod
    def from_wire(cls, reply: dict[Any, Any]) -> PushReply:
        return cls(_count(reply.get("new"), "new"), _count(reply.get("bad"), "bad"))


@dataclass(frozen=True)
class SyncReply:
    m: bytes | None  # None: reconciliation is done

    def to_wire(self) -> dict[str, Any]:
        return {"v": VERSION, "m": self.m}

    @classmethod
    def from_wire(cls, reply: dict[Any, Any]) -> SyncReply:
        m = reply.get("m")
        if m is not None and type(m) is not bytes:
            raise ValidationError("sync reply 'm' must be bytes or null")
        return cls(m)


@dataclass(frozen=True)
class GetReply:
    items: tuple[bytes, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"v": VERSION, "items": list(self.items)}

    @classmethod
    def from_wire(cls, reply: dict[Any, Any]) -> GetReply:
        return cls(_bytes_list(reply.get("items"), "items", "get reply"))


@dataclass(frozen=True)
class CheckpointReply:
    cp: Checkpoint | None  # None: the peer has adopted no checkpoint
    accounts: tuple[AccountSummary, ...]
    pages: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "cp": None if self.cp is None else self.cp.to_bytes(),
            "acc": encode_accounts(self.accounts),
            "pages": self.pages,
        }

    @classmethod
    def from_wire(cls, reply: dict[Any, Any]) -> CheckpointReply:
        raw = reply.get("cp")
        if raw is not None and type(raw) is not bytes:
            raise ValidationError("ckpt reply 'cp' must be bytes or null")
        pages = reply.get("pages")
        if type(pages) is not int or not 1 <= pages <= MAX_PAGES:
            raise ValidationError(f"ckpt reply 'pages' must be 1..{MAX_PAGES}")
        cp = None if raw is None else Checkpoint.from_bytes(raw)
        return cls(cp, tuple(decode_accounts(reply.get("acc"), limit=ACCOUNTS_PAGE)), pages)


@dataclass(frozen=True)
class VoteReply:
    vote: bytes  # a signed CheckpointVote (checked by the proposer's assembler)

    def to_wire(self) -> dict[str, Any]:
        return {"v": VERSION, "vote": self.vote}

    @classmethod
    def from_wire(cls, reply: dict[Any, Any]) -> VoteReply:
        vote = reply.get("vote")
        if type(vote) is not bytes or len(vote) > CheckpointVote.MAX_BYTES:
            raise ValidationError("ckpt_sign reply without 'vote' bytes")
        return cls(vote)


@dataclass(frozen=True)
class ErrorReply:
    err: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "err", self.err[:MAX_ERROR])

    def to_wire(self) -> dict[str, Any]:
        return {"v": VERSION, "err": self.err}


Reply = (
    CertifyReply
    | CertifyManyReply
    | PushReply
    | SyncReply
    | GetReply
    | CheckpointReply
    | VoteReply
    | ErrorReply
)
R = TypeVar(
    "R", CertifyReply, CertifyManyReply, PushReply, SyncReply, GetReply, CheckpointReply, VoteReply
)


def decode_reply(raw: object, expected: type[R]) -> R | ErrorReply:
    """The reply to a request whose reply type is ``expected`` (or the peer's error)."""
    reply = _check_message(raw, "reply")
    if "err" in reply:
        err = reply["err"]
        return ErrorReply(err if isinstance(err, str) else repr(err))
    return expected.from_wire(reply)


def reply_type(
    request: Request,
) -> type[
    CertifyReply | CertifyManyReply | PushReply | SyncReply | GetReply | CheckpointReply | VoteReply
]:
    match request:
        case Certify():
            return CertifyReply
        case CertifyMany():
            return CertifyManyReply
        case Push():
            return PushReply
        case Sync():
            return SyncReply
        case Get():
            return GetReply
        case GetCheckpoint():
            return CheckpointReply
        case SignCheckpoint():
            return VoteReply


__all__ = [
    "MAX_BATCH",
    "MAX_FRAME",
    "MAX_ITEMS",
    "MAX_ITEM_PAYLOAD",
    "OPS",
    "VERSION",
    "Certify",
    "CertifyMany",
    "CertifyManyReply",
    "CertifyReply",
    "CheckpointReply",
    "ErrorReply",
    "Get",
    "GetCheckpoint",
    "GetReply",
    "Push",
    "PushReply",
    "Reply",
    "Request",
    "SignCheckpoint",
    "Sync",
    "SyncReply",
    "VoteReply",
    "decode_reply",
    "decode_request",
    "reply_type",
]
