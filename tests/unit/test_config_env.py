"""Settings from the environment: known EDGESWARM_* names are settings, others are not ours."""

from __future__ import annotations

import pytest

from peer.config import ConfigError, load_config


def test_unknown_edgeswarm_variables_are_ignored(tmp_path: object) -> None:
    env = {"EDGESWARM_TEST_MDNS": "1", "EDGESWARM_SOMETHING_NEWER": "x"}
    cfg = load_config(env={**env, "EDGESWARM_DATA_DIR": str(tmp_path)})
    assert cfg.mdns is False


def test_the_issue_settings_come_from_the_environment(tmp_path: object) -> None:
    cfg = load_config(
        env={
            "EDGESWARM_DATA_DIR": str(tmp_path),
            "EDGESWARM_LEDGER_EPOCH": "2.5",
            "EDGESWARM_LEDGER_POW_BITS": "6",
            "EDGESWARM_LEDGER_ELIGIBLE_EARNED": "0.5",
            "EDGESWARM_LEDGER_BASE_LIMIT": "50",
            "EDGESWARM_SPOT_CHECK": "0.2",
        }
    )
    assert (cfg.ledger_epoch, cfg.ledger_pow_bits, cfg.ledger_eligible_earned) == (2.5, 6, 0.5)
    assert (cfg.ledger_base_limit, cfg.spot_check) == (50.0, 0.2)


def test_bad_values_of_known_settings_still_fail(tmp_path: object) -> None:
    with pytest.raises(ConfigError, match="ledger_pow_bits"):
        load_config(env={"EDGESWARM_DATA_DIR": str(tmp_path), "EDGESWARM_LEDGER_POW_BITS": "x"})
