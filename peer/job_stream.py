"""``/edgeswarm/job/1``: length-prefixed job frames over one libp2p stream.

``FrameStream`` wraps an ``INetStream``: ``send(frame)`` writes
``uvarint(len) || encode_frame(frame)`` in one write (under a lock, so tasks
sharing a lease stream never interleave frames), ``receive()`` returns the next
decoded frame. The receive side is bounded: ``FrameDecoder`` rejects a frame
whose announced length is over ``max_frame`` before buffering its body, and
``decode_frame`` checks signatures of signed frames. Stream ends and resets
become ``JobStreamClosed``; malformed bytes stay ``ProtocolError``\\s.
"""

from __future__ import annotations

import contextlib
from typing import Any

import trio

from protocols.codec import FrameDecoder, frame
from protocols.market import (
    JOB_PROTOCOL_ID,
    MAX_PAYLOAD_FRAME,
    JobFrame,
    decode_frame,
    encode_frame,
)

JOB_PROTOCOL = JOB_PROTOCOL_ID
READ_CHUNK = 256 * 1024
# Signed frames and BatchClose are small; only JobInput/JobResult carry tensors.
CONTROL_FRAME_MAX = 4096


class JobStreamClosed(Exception):
    """The job stream ended (EOF, reset or connection lost)."""


class FrameStream:
    """One job stream, framed. Not safe for two concurrent receivers."""

    def __init__(self, stream: Any, *, max_frame: int = MAX_PAYLOAD_FRAME) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self._decoder = FrameDecoder(max_size=max_frame)
        self._write_lock = trio.Lock()
        self.closed = False

    def set_max_frame(self, max_frame: int) -> None:
        """Change the receive cap (e.g. small until an award is accepted, then payload-sized)."""
        self.max_frame = max_frame
        self._decoder.max_size = max_frame

    @property
    def remote_peer(self) -> str:
        return str(self.stream.muxed_conn.peer_id)

    async def send(self, item: JobFrame) -> None:
        data = frame(encode_frame(item), max_size=MAX_PAYLOAD_FRAME)
        await self.send_raw(data)

    async def send_many(self, items: list[JobFrame]) -> None:
        """Several frames in one write: nothing another task sends can come between them
        (a result and the commitment that covers it), and one write instead of many."""
        if items:
            await self.send_raw(
                b"".join(frame(encode_frame(i), max_size=MAX_PAYLOAD_FRAME) for i in items)
            )

    async def send_raw(self, data: bytes) -> None:
        async with self._write_lock:
            try:
                await self.stream.write(data)
            except trio.Cancelled:
                raise
            except Exception as exc:
                raise JobStreamClosed(f"cannot write to the job stream: {_why(exc)}") from None

    async def send_bytes(self, payload: bytes) -> None:
        """One frame of already-encoded bytes (e.g. a signed message's ``to_bytes()``)."""
        await self.send_raw(frame(payload, max_size=self.max_frame))

    async def receive_bytes(self) -> bytes:
        """The next frame's bytes, undecoded (within ``max_frame``); ``JobStreamClosed`` at
        the end."""
        while True:
            raw = self._decoder.next_frame()
            if raw is not None:
                return raw
            await self._fill()

    async def receive(self) -> JobFrame:
        """The next frame; ``JobStreamClosed`` at the end, ``ProtocolError`` on bad bytes."""
        while True:
            raw = self._decoder.next_frame()
            if raw is not None:
                return decode_frame(raw, max_size=self.max_frame)
            await self._fill()

    async def _fill(self) -> None:
        try:
            chunk = await self.stream.read(READ_CHUNK)
        except trio.Cancelled:
            raise
        except Exception as exc:
            raise JobStreamClosed(f"job stream ended: {_why(exc)}") from None
        if not chunk:
            raise JobStreamClosed("job stream ended")
        self._decoder.feed(chunk)  # FrameTooLarge before the body is buffered

    async def close(self) -> None:
        """Close gracefully (bounded, shielded: also runs while being cancelled)."""
        if self.closed:
            return
        self.closed = True
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(2.0),
            contextlib.suppress(Exception),  # already gone: nothing left to close
        ):
            await self.stream.close()

    async def reset(self) -> None:
        if self.closed:
            return
        self.closed = True
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(2.0),
            contextlib.suppress(Exception),  # already gone: nothing left to close
        ):
            await self.stream.reset()


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
