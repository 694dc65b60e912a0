"""Rules of the ``/edgeswarm/ledger/1`` wire (protocols/ledger_rpc.py), one test per rule.

Each test fails when its rule is removed (issue 17, mutation testing): the caps on
items, counts, pages, votes and account rows; the types each field must have; the
envelope version; the exact field names of every request and reply (golden
encodings); and that everything refused is refused with the protocol error family.
"""

from __future__ import annotations

import hashlib

import nacl.signing
import pytest

from protocols.checkpoint import (
    ACCOUNTS_PAGE,
    GENESIS_PREV,
    SUM_BYTES,
    AccountSummary,
    CheckpointHeader,
    CheckpointVote,
    make_checkpoint,
    sign_checkpoint,
)
from protocols.codec import decode, encode
from protocols.errors import ProtocolError, ValidationError
from protocols.identity import peer_id_from_public_key
from protocols.ledger_rpc import (
    MAX_BATCH,
    MAX_FRAME,
    MAX_ITEM_PAYLOAD,
    MAX_ITEMS,
    OPS,
    VERSION,
    Certify,
    CertifyReply,
    CheckpointReply,
    ErrorReply,
    Get,
    GetCheckpoint,
    GetReply,
    Push,
    PushReply,
    Request,
    SignCheckpoint,
    Sync,
    SyncReply,
    VoteReply,
    decode_reply,
    decode_request,
    reply_type,
)

MAX_PAGES = 1 << 12  # pages of account rows one checkpoint reply may announce


def _key(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(hashlib.sha256(b"rpc-key%d" % n).digest())


def _pid(n: int) -> str:
    return peer_id_from_public_key(bytes(_key(n).verify_key))


HEADER = CheckpointHeader(
    network=bytes(range(32)),
    epoch=1,
    prev=GENESIS_PREV,
    cut_ms=1_800_000_000_000,
    covered_sum=bytes([7]) * SUM_BYTES,
    covered_count=3,
    accounts=bytes(range(32, 64)),
    n_accounts=2,
)
CHECKPOINT = make_checkpoint(HEADER, [sign_checkpoint(_key(i), HEADER) for i in range(2)])
ROW = AccountSummary(account=_pid(9), balance=-5, next_seq=2, received=0, earned=0)
ROWS = (ROW, AccountSummary(account=_pid(8), balance=5, next_seq=1, received=5, earned=4))
VOTE = sign_checkpoint(_key(0), HEADER).to_bytes()


def _wire(raw: object) -> object:
    """What the other side decodes: the canonical CBOR of ``raw``, decoded."""
    return decode(encode(raw), max_size=MAX_FRAME)


def _ckpt_reply(**over: object) -> dict[str, object]:
    raw: dict[str, object] = {"v": 1, "cp": None, "acc": [], "pages": 1}
    raw.update(over)
    return raw


# --- constants: the caps are part of the protocol ------------------------------------------


def test_the_wire_caps_are_the_documented_ones() -> None:
    """Frame 1 MiB, 512 items per push/get, 64 KiB of envelope room, version 1, seven ops,
    64 transfer requests per certify_many."""
    assert VERSION == 1
    assert MAX_FRAME == 1 << 20
    assert MAX_ITEMS == 512
    assert MAX_ITEM_PAYLOAD == MAX_FRAME - 64 * 1024
    assert OPS == ("certify", "certify_many", "push", "sync", "get", "ckpt", "ckpt_sign")
    assert MAX_BATCH == 64


# --- envelope --------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [None, [], b"", "x", 1, {"op": "ckpt", "p": 0}])
def test_a_request_is_a_versioned_map(raw: object) -> None:
    with pytest.raises(ValidationError):
        decode_request(raw)


@pytest.mark.parametrize("v", [0, 2, None, "1", 1.5])
def test_a_request_or_reply_of_another_version_is_refused(v: object) -> None:
    with pytest.raises(ValidationError):
        decode_request({"v": v, "op": "ckpt", "p": 0})
    with pytest.raises(ValidationError):
        decode_reply({"v": v, "vote": VOTE}, VoteReply)


@pytest.mark.parametrize("op", ["CKPT", "ckpt_sig", "Ckpt_sign", "", None, 5, "steal"])
def test_an_unknown_op_is_refused(op: object) -> None:
    with pytest.raises(ValidationError):
        decode_request({"v": 1, "op": op, "p": 0, "h": HEADER.to_body()})


# --- ckpt: GetCheckpoint ---------------------------------------------------------------------


@pytest.mark.parametrize("page", [0, 1, MAX_PAGES - 1])
def test_get_checkpoint_pages_are_0_to_4095(page: int) -> None:
    req = GetCheckpoint(page)
    assert req.to_wire() == {"v": 1, "op": "ckpt", "p": page}
    assert decode_request(_wire(req.to_wire())) == req


@pytest.mark.parametrize("page", [-1, MAX_PAGES, MAX_PAGES + 1, True, False, "0", 0.0, None])
def test_get_checkpoint_page_out_of_range_or_not_an_int_is_refused(page: object) -> None:
    with pytest.raises(ValidationError):
        GetCheckpoint(page)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        decode_request({"v": 1, "op": "ckpt", "p": page})


def test_get_checkpoint_without_its_page_is_refused() -> None:
    with pytest.raises(ValidationError):
        decode_request({"v": 1, "op": "ckpt"})
    with pytest.raises(ValidationError):
        decode_request({"v": 1, "op": "ckpt", "P": 0})


def test_get_checkpoint_golden_encoding() -> None:
    assert encode(GetCheckpoint(7).to_wire()).hex() == "a3617007617601626f7064636b7074"


# --- ckpt_sign: SignCheckpoint ---------------------------------------------------------------


def test_sign_checkpoint_carries_the_header_body_and_round_trips() -> None:
    req = SignCheckpoint(HEADER)
    assert req.to_wire() == {"v": 1, "op": "ckpt_sign", "h": HEADER.to_body()}
    back = decode_request(_wire(req.to_wire()))
    assert back == req
    assert isinstance(back, SignCheckpoint)
    assert back.header.digest == HEADER.digest


@pytest.mark.parametrize(
    "h",
    [
        None,
        HEADER.to_bytes(),
        {**HEADER.to_body(), "extra": 1},
        {k: v for k, v in HEADER.to_body().items() if k != "epoch"},
        {**HEADER.to_body(), "v": 2},
        {**HEADER.to_body(), "epoch": 0},
        {**HEADER.to_body(), "prev": bytes(31)},
    ],
)
def test_sign_checkpoint_with_a_bad_or_missing_header_is_refused(h: object) -> None:
    """The header is checked like any checkpoint header: exact fields, version, bounds."""
    with pytest.raises(ProtocolError):
        decode_request({"v": 1, "op": "ckpt_sign", "h": h})


def test_sign_checkpoint_without_its_header_is_refused() -> None:
    with pytest.raises(ProtocolError):
        decode_request({"v": 1, "op": "ckpt_sign"})
    with pytest.raises(ProtocolError):
        decode_request({"v": 1, "op": "ckpt_sign", "H": HEADER.to_body()})


def test_sign_checkpoint_golden_encoding() -> None:
    digest = hashlib.sha256(encode(SignCheckpoint(HEADER).to_wire())).hexdigest()
    assert digest == GOLDEN["sign_checkpoint"]


# --- CheckpointReply -------------------------------------------------------------------------


def test_checkpoint_reply_without_a_checkpoint_round_trips() -> None:
    reply = CheckpointReply(None, (), 1)
    assert reply.to_wire() == {"v": 1, "cp": None, "acc": [], "pages": 1}
    assert decode_reply(_wire(reply.to_wire()), CheckpointReply) == reply


def test_checkpoint_reply_with_a_checkpoint_and_rows_round_trips() -> None:
    reply = CheckpointReply(CHECKPOINT, ROWS, 3)
    assert reply.to_wire() == {
        "v": 1,
        "cp": CHECKPOINT.to_bytes(),
        "acc": [r.to_wire() for r in ROWS],
        "pages": 3,
    }
    back = decode_reply(_wire(reply.to_wire()), CheckpointReply)
    assert back == reply
    assert isinstance(back, CheckpointReply)
    assert back.cp is not None and back.cp.to_bytes() == CHECKPOINT.to_bytes()


@pytest.mark.parametrize("pages", [1, 2, MAX_PAGES])
def test_checkpoint_reply_pages_are_1_to_4096(pages: int) -> None:
    assert decode_reply(_ckpt_reply(pages=pages), CheckpointReply) == CheckpointReply(
        None, (), pages
    )


@pytest.mark.parametrize("pages", [0, -1, MAX_PAGES + 1, True, "1", 1.0, None])
def test_checkpoint_reply_pages_out_of_range_or_not_an_int_are_refused(pages: object) -> None:
    with pytest.raises(ValidationError):
        decode_reply(_ckpt_reply(pages=pages), CheckpointReply)


def test_checkpoint_reply_without_pages_is_refused() -> None:
    raw = _ckpt_reply()
    del raw["pages"]
    with pytest.raises(ValidationError):
        decode_reply(raw, CheckpointReply)


@pytest.mark.parametrize("cp", ["text", 5, [], {}, b"", b"\xa0", HEADER.to_bytes()])
def test_checkpoint_reply_cp_must_be_checkpoint_bytes_or_null(cp: object) -> None:
    with pytest.raises(ProtocolError):
        decode_reply(_ckpt_reply(cp=cp), CheckpointReply)


def test_checkpoint_reply_without_cp_means_no_checkpoint() -> None:
    """An absent ``cp`` reads as null (the peer has adopted none), never as garbage."""
    raw = _ckpt_reply()
    del raw["cp"]
    assert decode_reply(raw, CheckpointReply) == CheckpointReply(None, (), 1)


@pytest.mark.parametrize(
    "acc", [None, b"", "rows", [["x", 0, 1, 0, 0]], [[ROW.account, 0, 1, 0]], ROW.to_wire()]
)
def test_checkpoint_reply_rows_must_be_account_summaries(acc: object) -> None:
    with pytest.raises(ValidationError):
        decode_reply(_ckpt_reply(acc=acc), CheckpointReply)


def test_checkpoint_reply_without_rows_is_refused() -> None:
    raw = _ckpt_reply()
    del raw["acc"]
    with pytest.raises(ValidationError):
        decode_reply(raw, CheckpointReply)


def test_checkpoint_reply_carries_at_most_one_page_of_rows() -> None:
    page = [ROW.to_wire()] * ACCOUNTS_PAGE
    got = decode_reply(_ckpt_reply(acc=page), CheckpointReply)
    assert isinstance(got, CheckpointReply) and len(got.accounts) == ACCOUNTS_PAGE
    with pytest.raises(ValidationError):
        decode_reply(_ckpt_reply(acc=[*page, ROW.to_wire()]), CheckpointReply)


def test_checkpoint_reply_golden_encodings() -> None:
    assert encode(CheckpointReply(None, (), 1).to_wire()).hex() == (
        "a4617601626370f6636163638065706167657301"
    )
    digest = hashlib.sha256(encode(CheckpointReply(CHECKPOINT, ROWS, 3).to_wire())).hexdigest()
    assert digest == GOLDEN["checkpoint_reply"]


# --- VoteReply -------------------------------------------------------------------------------


def test_vote_reply_round_trips() -> None:
    reply = VoteReply(VOTE)
    assert reply.to_wire() == {"v": 1, "vote": VOTE}
    assert decode_reply(_wire(reply.to_wire()), VoteReply) == reply


def test_vote_reply_is_capped_at_a_vote_s_size() -> None:
    """A vote of ``CheckpointVote.MAX_BYTES`` passes; one byte more is refused."""
    assert CheckpointVote.MAX_BYTES == 384
    top = b"\x01" * CheckpointVote.MAX_BYTES
    assert decode_reply({"v": 1, "vote": top}, VoteReply) == VoteReply(top)
    with pytest.raises(ValidationError):
        decode_reply({"v": 1, "vote": top + b"\x01"}, VoteReply)


@pytest.mark.parametrize("vote", [None, "vote", 5, [VOTE], bytearray(VOTE)])
def test_vote_reply_vote_must_be_bytes(vote: object) -> None:
    with pytest.raises(ValidationError):
        decode_reply({"v": 1, "vote": vote}, VoteReply)


def test_vote_reply_without_its_vote_is_refused() -> None:
    with pytest.raises(ValidationError):
        decode_reply({"v": 1}, VoteReply)
    with pytest.raises(ValidationError):
        decode_reply({"v": 1, "VOTE": VOTE}, VoteReply)


def test_vote_reply_golden_encoding() -> None:
    assert encode(VoteReply(b"\x01\x02").to_wire()).hex() == "a261760164766f7465420102"


# --- ErrorReply ------------------------------------------------------------------------------


def test_error_reply_round_trips_and_is_cut_at_400_characters() -> None:
    assert ErrorReply("no").err == "no"
    assert ErrorReply("no").to_wire() == {"v": 1, "err": "no"}
    assert ErrorReply("y" * 400).err == "y" * 400
    assert ErrorReply("y" * 401).err == "y" * 400
    assert decode_reply(_wire(ErrorReply("busy").to_wire()), VoteReply) == ErrorReply("busy")


@pytest.mark.parametrize("err", [5, None, b"\xff", ["a"]])
def test_an_error_that_is_not_text_is_shown_as_its_repr(err: object) -> None:
    assert decode_reply({"v": 1, "err": err}, CheckpointReply) == ErrorReply(repr(err))


def test_error_reply_golden_encoding() -> None:
    assert encode(ErrorReply("no").to_wire()).hex() == "a261760163657272626e6f"


# --- the other requests and replies: caps at their exact bound --------------------------------


def test_push_and_get_carry_at_most_512() -> None:
    items = tuple(b"i" for _ in range(MAX_ITEMS))
    ids = tuple(bytes(32) for _ in range(MAX_ITEMS))
    assert decode_request(Push(items).to_wire()) == Push(items)
    assert decode_request(Get(ids).to_wire()) == Get(ids)
    assert decode_reply(GetReply(items).to_wire(), GetReply) == GetReply(items)
    with pytest.raises(ValidationError):
        Push((*items, b"i"))
    with pytest.raises(ValidationError):
        Get((*ids, bytes(32)))
    with pytest.raises(ValidationError):
        decode_reply({"v": 1, "items": [*items, b"i"]}, GetReply)


@pytest.mark.parametrize("n", [0, 1, MAX_ITEMS])
def test_push_reply_counts_are_0_to_512(n: int) -> None:
    assert decode_reply({"v": 1, "new": n, "bad": n}, PushReply) == PushReply(n, n)


@pytest.mark.parametrize("n", [-1, MAX_ITEMS + 1, True, "1", None])
def test_push_reply_counts_out_of_range_are_refused(n: object) -> None:
    with pytest.raises(ValidationError):
        decode_reply({"v": 1, "new": n, "bad": 0}, PushReply)
    with pytest.raises(ValidationError):
        decode_reply({"v": 1, "new": 0, "bad": n}, PushReply)


def test_certify_and_sync_replies_need_their_bytes() -> None:
    for raw, kind in (({"v": 1}, CertifyReply), ({"v": 1, "r": "x"}, CertifyReply)):
        with pytest.raises(ValidationError):
            decode_reply(raw, kind)
    with pytest.raises(ValidationError):
        decode_reply({"v": 1, "m": 1}, SyncReply)
    assert decode_reply({"v": 1}, SyncReply) == SyncReply(None)


def test_every_request_has_its_reply_type() -> None:
    pairs: list[tuple[Request, type]] = [
        (Certify(b"r"), CertifyReply),
        (Push(()), PushReply),
        (Sync(b"m"), SyncReply),
        (Get(()), GetReply),
        (GetCheckpoint(0), CheckpointReply),
        (SignCheckpoint(HEADER), VoteReply),
    ]
    for req, kind in pairs:
        assert reply_type(req) is kind


def test_the_other_requests_golden_encodings() -> None:
    assert encode(Certify(b"\x01").to_wire()).hex() == GOLDEN["certify"]
    assert encode(Push((b"\x01",)).to_wire()).hex() == GOLDEN["push"]
    assert encode(Sync(b"\x01").to_wire()).hex() == GOLDEN["sync"]
    assert encode(Get((bytes(32),)).to_wire()).hex() == GOLDEN["get"]
    assert encode(PushReply(1, 2).to_wire()).hex() == GOLDEN["push_reply"]
    assert encode(SyncReply(None).to_wire()).hex() == GOLDEN["sync_reply"]
    assert encode(GetReply((b"\x01",)).to_wire()).hex() == GOLDEN["get_reply"]
    assert encode(CertifyReply(b"\x01").to_wire()).hex() == GOLDEN["certify_reply"]


# Canonical CBOR (keys by length, then bytes); the long ones as the sha256 of the encoding.
GOLDEN: dict[str, str] = {
    "sign_checkpoint": "6d1ff5a3c3f2b638cf772b66bcc1a70c29bc5e3802b9f2e944b7727de9e26773",
    "checkpoint_reply": "ce9ab677cf5ab003636ef88841164118d2e6ccb432da897ba4960eb0a66c35c2",
    "certify": "a3617601626f706763657274696679637265714101",
    "push": "a3617601626f706470757368656974656d73814101",
    "sync": "a3616d4101617601626f706473796e63",
    "get": "a3617601626f706367657463696473815820" + "00" * 32,
    "push_reply": "a36176016362616402636e657701",
    "sync_reply": "a2616df6617601",
    "get_reply": "a2617601656974656d73814101",
    "certify_reply": "a261724101617601",
}
