"""The one error family of edgeswarm's protocols.

Like h11: ``LocalProtocolError`` means *we* tried to do something the
protocol forbids (a programming or usage error on this side);
``RemoteProtocolError`` means the bytes or messages that came from someone
else are invalid. Messages are written for the person who has to act on them:
they say what was expected and what came.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every error raised by ``protocols``."""


class LocalProtocolError(ProtocolError):
    """This side misused the protocol (bad arguments, wrong state)."""


class RemoteProtocolError(ProtocolError):
    """Data from the network (or another untrusted source) is invalid."""


class FrameTooLarge(RemoteProtocolError):
    """A length prefix announced more bytes than the cap for its kind."""


class DecodeError(RemoteProtocolError):
    """Bytes are not valid canonical CBOR, or not the expected shape."""


class SignatureError(RemoteProtocolError):
    """A signature does not verify for the claimed signer and domain."""


class ValidationError(RemoteProtocolError):
    """A well-formed message breaks a rule (expired, wrong field, over cap)."""
