"""Rules of receipts and batch digests that mutation testing found no test holding (issue 17).
Each test names one rule and fails when that rule is broken
(``python bench/mutation.py --paths protocols/receipt.py``).
"""

from __future__ import annotations

import pytest

from protocols.errors import LocalProtocolError
from protocols.receipt import MAX_BATCH, batch_digest


def test_a_batch_holds_up_to_max_batch_jobs() -> None:
    d = b"\x01" * 32
    assert len(batch_digest([d] * MAX_BATCH)) == 32
    with pytest.raises(LocalProtocolError, match="at most"):
        batch_digest([d] * (MAX_BATCH + 1))
