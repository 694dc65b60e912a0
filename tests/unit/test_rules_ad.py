"""Ad selection rules that mutation testing found no test holding (issue 17)."""

from __future__ import annotations

from test_ad import KEY, NOW, PID, make_ad

from protocols.ad import ad_key, build_ad, select_best


def test_an_invalid_record_before_valid_ones_is_skipped_not_the_end_of_the_search() -> None:
    values = [b"garbage", build_ad(KEY, make_ad(seq=1)), build_ad(KEY, make_ad(seq=2))]
    assert select_best(ad_key(PID), values, NOW) == 2
