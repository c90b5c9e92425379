"""read_secret_file refuses the example placeholder shipped in deploy/, so an install that
kept it fails loudly instead of running with a token printed in the repository."""

from pathlib import Path

import pytest
import yaml

from zstore.config import ConfigError, read_secret_file

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("value", ["REPLACE-ME-with-a-long-random-token", "REPLACE-ME-chap-secret",
                                   "  REPLACE-ME\n", "prefix-REPLACE-ME-suffix"])
def test_placeholder_refused(tmp_path: Path, value: str):
    (tmp_path / "token").write_text(value)
    with pytest.raises(ConfigError, match="placeholder") as e:
        read_secret_file(str(tmp_path / "token"), "token")
    assert str(tmp_path / "token") in str(e.value)


def test_the_shipped_secret_is_refused(tmp_path: Path):
    """The very token deploy/kubernetes/secret.yaml installs."""
    secret = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "secret.yaml").read_text())
    (tmp_path / "token").write_text(secret["stringData"]["token"])
    with pytest.raises(ConfigError, match="placeholder"):
        read_secret_file(str(tmp_path / "token"), "token")


def test_real_secret_accepted(tmp_path: Path):
    (tmp_path / "token").write_text("9f2c1e0a7b5d4c3e8a6f1b2d0c9e7a5f\n")
    assert read_secret_file(str(tmp_path / "token"), "token") == "9f2c1e0a7b5d4c3e8a6f1b2d0c9e7a5f"
