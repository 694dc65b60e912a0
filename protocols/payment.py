"""The payer's side of certification, sans-IO: one transfer, its committee, its votes.

Order of actions the I/O layer performs:

1. ``session = PaymentSession.start(key, receipt, ledger, now_ms)`` makes the
   transfer with ``seq = ledger.next_seq(payer)``. Its first action is
   ``PersistTransfer``: the signed transfer must be stored durably *before*
   any witness sees it. After a crash the payer must resend that same
   transfer (``PaymentSession.resume``); signing a fresh one for the same
   seq would be an equivocation and get the payer banned.
2. After the store acknowledged, ``session.persisted()`` returns one
   ``SendRequest(witness, bytes)`` per committee member.
3. Each answer goes to ``session.on_reply(witness, reply_bytes)``, which
   returns the next actions: ``Certified(certificate)`` once a quorum voted,
   ``SendRequest`` again with the certificates a witness said it lacks, or
   ``Failed`` when so many refused that no quorum is possible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import nacl.signing

from protocols.certificate import Certificate, CertificateAssembler, WitnessVote
from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.identity import peer_id_from_public_key
from protocols.ledger import Transfer, sign_transfer
from protocols.ledger_state import LedgerState
from protocols.proofs import EquivocationProof, PayableReceipt
from protocols.signed import Signed
from protocols.witness import MAX_HISTORY, Refusal, Refuse, TransferRequest, decode_reply


@dataclass(frozen=True)
class PersistTransfer:
    """Store ``transfer`` durably, then call ``PaymentSession.persisted()``."""

    transfer: Signed[Transfer]


@dataclass(frozen=True)
class SendRequest:
    """Send ``data`` (a ``TransferRequest``) to ``witness`` on /edgeswarm/ledger/1."""

    witness: str
    data: bytes


@dataclass(frozen=True)
class Certified:
    """Done: store and gossip ``certificate`` (and ingest it into the ledger)."""

    certificate: Certificate


@dataclass(frozen=True)
class Failed:
    """No quorum is possible any more; ``refusals`` says who refused and why."""

    refusals: dict[str, Refuse]


PaymentAction = PersistTransfer | SendRequest | Certified | Failed


class PaymentSession:
    """Collects votes for one transfer from the payer's committee."""

    def __init__(
        self,
        transfer: Signed[Transfer],
        receipt: PayableReceipt,
        ledger: LedgerState,
        *,
        history_for: Callable[[str, int], list[Certificate]] | None = None,
    ) -> None:
        self.transfer = transfer
        self.receipt = receipt
        t = transfer.message
        # The committee of the newest checkpoint lag epochs before the transfer (a witness
        # holding the same checkpoints draws the same one; see protocols.epochs).
        self.cp = ledger.rule.cp_for(t.time_ms)
        self.committee = ledger.rule.committee_at(t.payer, self.cp, t.time_ms)
        self._assembler = CertificateAssembler(transfer, self.committee, self.cp)
        self._history_for = history_for
        self.refusals: dict[str, Refuse] = {}
        self.equivocation: EquivocationProof | None = None
        self._persisted = False
        self._finished = False
        self._retried: set[str] = set()
        self._retrying: set[str] = set()

    @classmethod
    def start(
        cls,
        key: nacl.signing.SigningKey,
        receipt: PayableReceipt,
        ledger: LedgerState,
        now_ms: int,
        *,
        history_for: Callable[[str, int], list[Certificate]] | None = None,
        seq: int | None = None,
    ) -> tuple[PaymentSession, PersistTransfer]:
        """A new transfer paying ``receipt`` with the payer's next seq, or with ``seq``: a
        pipelining payer numbers several transfers ahead of their certificates (it must
        never sign a seq twice: that is an equivocation)."""
        payer = peer_id_from_public_key(bytes(key.verify_key))
        if payer != receipt.requester:
            raise LocalProtocolError(f"{payer} is not the requester of this receipt")
        transfer = sign_transfer(
            key,
            Transfer(
                payer=payer,
                payee=receipt.executor,
                amount=receipt.price,
                seq=ledger.next_seq(payer) if seq is None else seq,
                receipt_id=receipt.receipt_id,
                time_ms=now_ms,
            ),
        )
        session = cls(transfer, receipt, ledger, history_for=history_for)
        return session, PersistTransfer(transfer)

    @classmethod
    def resume(
        cls,
        transfer: Signed[Transfer],
        receipt: PayableReceipt,
        ledger: LedgerState,
        *,
        history_for: Callable[[str, int], list[Certificate]] | None = None,
    ) -> tuple[PaymentSession, list[SendRequest]]:
        """After a restart: the stored transfer, already durable, asked again."""
        session = cls(transfer, receipt, ledger, history_for=history_for)
        return session, session.persisted()

    def _request(self, history: tuple[Certificate, ...] = ()) -> bytes:
        return TransferRequest(self.transfer, self.receipt, history[:MAX_HISTORY]).to_bytes()

    def persisted(self) -> list[SendRequest]:
        """The transfer is durable: ask every committee member."""
        self._persisted = True
        data = self._request()
        return [SendRequest(w, data) for w in self.committee.members]

    @property
    def certificate(self) -> Certificate | None:
        return self._assembler.certificate

    def on_reply(self, witness: str, data: bytes) -> list[PaymentAction]:
        """Handle one witness's answer. Garbage raises ``RemoteProtocolError``."""
        if not self._persisted:
            raise LocalProtocolError("persist the transfer before talking to witnesses")
        if self._finished or witness not in self.committee:
            return []
        reply = decode_reply(data)
        self._retrying.discard(witness)
        if isinstance(reply, EquivocationProof):
            # Our own key signed two transfers for this seq: nothing can fix that.
            self.equivocation = reply
            self.refusals[witness] = Refuse(Refusal.EQUIVOCATION, "payer equivocated")
        elif isinstance(reply, Refuse):
            if (
                reply.reason is Refusal.MISSING_HISTORY
                and reply.next_seq is not None
                and self._history_for is not None
                and witness not in self._retried
            ):
                history = self._history_for(self.transfer.message.payer, reply.next_seq)
                if history:
                    self._retried.add(witness)  # one retry per witness
                    self._retrying.add(witness)
                    self.refusals[witness] = reply
                    return [SendRequest(witness, self._request(tuple(history)))]
            self.refusals[witness] = reply
        else:
            vote: Signed[WitnessVote] = reply
            if vote.message.witness != witness:
                raise RemoteProtocolError(
                    f"{witness} answered with a vote of {vote.message.witness}"
                )
            self.refusals.pop(witness, None)
            cert = self._assembler.add_vote(vote)
            if cert is not None:
                self._finished = True
                return [Certified(cert)]
        final_refusals = [w for w in self.refusals if w not in self._retrying]
        if len(final_refusals) > self.committee.size - self.committee.quorum:
            self._finished = True
            return [Failed(dict(self.refusals))]
        return []


__all__ = [
    "Certified",
    "Failed",
    "PaymentAction",
    "PaymentSession",
    "PersistTransfer",
    "SendRequest",
]
