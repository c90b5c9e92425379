"""Every suffix the size pattern accepts parses, or is a SizeError: `1ki` was accepted
by the pattern, missing from the table, and ended in a KeyError traceback (CLI sizes,
`zstore up --chunk-capacity`, and a 500 from the meta API)."""

from __future__ import annotations

import argparse
import itertools
import string

import pytest

from meta import volumes
from zstore import up
from zstore.cli import main as cli
from zstore.errors import InvalidArgument
from zstore.units import SizeError, parse_size

BAD = ["1ki", "1kib", "1kiB", "1 ki", "2pi", "1mi", "1iB", "1i"]


@pytest.mark.parametrize("text", BAD)
def test_lower_case_binary_suffixes_are_size_errors(text: str) -> None:
    with pytest.raises(SizeError) as e:
        parse_size(text)
    assert repr(text) in str(e.value)


def test_every_suffix_of_up_to_three_letters_parses_or_is_a_size_error() -> None:
    for n in range(4):
        for letters in itertools.product(string.ascii_letters, repeat=n) if n < 3 else \
                (a + b + c for a in "kKMGTPm" for b in "iI" for c in "bBx"):
            text = "1" + "".join(letters)
            try:
                assert parse_size(text) > 0
            except SizeError:
                pass


@pytest.mark.parametrize("text, value", [("1k", 1000), ("1kB", 1000), ("1K", 1000), ("1Ki", 1024),
                                         ("1KiB", 1024), ("1Kib", 1024), ("3Mi", 3 * 2**20),
                                         ("1 Pi", 2**50), ("2G", 2 * 10**9)])
def test_the_real_suffixes_still_parse(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_cli_size_1ki_exits_2_in_one_line(capsys) -> None:
    code = cli.main(["--endpoint", "http://127.0.0.1:9", "volume", "create", "v", "--size", "1ki"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("zstore: error: invalid size '1ki'") and "Traceback" not in err


def test_up_chunk_capacity_1ki_is_an_argument_error() -> None:
    with pytest.raises(argparse.ArgumentTypeError) as e:
        up._capacity("1ki")
    assert "'1ki'" in str(e.value)


def test_meta_size_1ki_is_invalid_argument_not_500() -> None:
    with pytest.raises(InvalidArgument):
        volumes.check_size("1ki")
