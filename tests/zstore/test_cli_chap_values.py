"""The CLI refuses CHAP values LIO cannot store before any network call (exit 2, one line)."""

from __future__ import annotations

import io

import pytest

from tests.zstore.test_cli_unit import run
from zstore.cli import main as cli
from zstore.errors import InvalidArgument

IQN = "iqn.2004-10.com.example:h"


@pytest.mark.parametrize("extra, what", [(["--user", "NULL"], "--user 'NULL'"),
                                         (["--user", "NULLx"], "--user 'NULLx'"),
                                         (["--user", " u"], "--user ' u'"),
                                         (["--user", "u", "--mutual-user", "NULL"], "--mutual-user 'NULL'")])
def test_user_names_lio_cannot_store_exit_2(extra, what, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("initiator-secret-1\nmutual-secret-22\n"))
    code, out, err = run(["--endpoint", "http://127.0.0.1:9", "chap", "set", "*", IQN, *extra], capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"zstore: error: invalid {what}") and "Traceback" not in err


def test_a_secret_starting_with_null_is_refused_without_echoing_it() -> None:
    with pytest.raises(InvalidArgument, match="must not start with 'NULL'") as e:
        cli.read_chap_secrets(None, None, None, stdin=io.StringIO("NULLsecret-12345\n"))
    assert "NULLsecret-12345" not in e.value.message
