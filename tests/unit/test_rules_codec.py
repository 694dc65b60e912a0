"""Frame caps at their boundary (issue 17: mutation testing found no test holding them)."""

from __future__ import annotations

import pytest

from protocols.codec import FrameDecoder, frame
from protocols.errors import FrameTooLarge, LocalProtocolError


def test_a_frame_of_exactly_the_cap_is_built_and_read_and_one_byte_more_is_not() -> None:
    data = frame(b"abcd", max_size=4)
    d = FrameDecoder(max_size=4)
    d.feed(data)
    assert d.next_frame() == b"abcd"
    with pytest.raises(LocalProtocolError):
        frame(b"abcde", max_size=4)
    with pytest.raises(FrameTooLarge):
        d.feed(frame(b"abcde", max_size=5)[:1])  # only the header: refused before the body


def test_a_decoder_cap_is_at_least_one_byte() -> None:
    d = FrameDecoder(max_size=1)
    d.feed(frame(b"x", max_size=1))
    assert d.next_frame() == b"x"
    with pytest.raises(LocalProtocolError):
        FrameDecoder(max_size=0)
