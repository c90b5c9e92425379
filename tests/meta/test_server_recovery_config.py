"""The meta server's recovery settings: bad values are config errors naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.meta.test_server_tls_config import meta_config, serve_error
from zstore import config as zconfig


@pytest.mark.parametrize("setting, value, says", [
    ("recovery_stall_timeout", -1.0, "meta.recovery_stall_timeout must be 0 (never) or at least 60"),
    ("recovery_stall_timeout", float("nan"), "meta.recovery_stall_timeout must be 0 (never) or at least 60"),
    ("recovery_stall_timeout", 5.0, "meta.recovery_stall_timeout must be 0 (never) or at least 60"),
    ("recovery_stall_timeout", float("inf"), "meta.recovery_stall_timeout must be 0 (never) or at least 60"),
    ("recovery_grace", -1.0, "meta.recovery_grace must be >= 0"),
    ("recovery_concurrency", 0, "meta.recovery_concurrency >= 1"),
])
def test_bad_recovery_setting_is_a_config_error(tmp_path, setting, value, says) -> None:
    assert says in serve_error(meta_config(tmp_path, **{setting: value}))


def test_stall_timeout_from_the_environment_and_the_shipped_example(tmp_path) -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "zstore.toml.example"
    assert zconfig.load(example, env={}).meta.recovery_stall_timeout == 600
    env = {"ZSTORE_META_RECOVERY_STALL_TIMEOUT": "0"}
    assert zconfig.load(example, env=env).meta.recovery_stall_timeout == 0
