import pytest

from zstore.units import SizeError, format_size, parse_size


@pytest.mark.parametrize("text,want", [
    ("10Gi", 10 * 2**30), ("500M", 500 * 10**6), ("500Mi", 500 * 2**20), ("4096", 4096),
    ("1T", 10**12), ("1Ti", 2**40), ("1.5Gi", 3 * 2**29), ("2k", 2000), ("1GiB", 2**30), (" 3Ki ", 3072),
    (7, 7),
])
def test_parse(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "abc", "10Zi", "-1", "1.3", "1e9", "Gi", True, -5, "10 Gi Gi",
                                  "9" * 400 + ".5", "9" * 5000, "9" * 5000 + "Gi", "9" * 65])
def test_parse_rejects(text):
    with pytest.raises(SizeError):
        parse_size(text)


@pytest.mark.parametrize("n,want", [(2**30, "1Gi"), (3 * 2**29, "1.5Gi"), (512, "512B"), (2**20, "1Mi"),
                                    (5 * 2**40, "5Ti")])
def test_format(n, want):
    assert format_size(n) == want


def test_a_huge_digit_run_is_a_size_error_with_a_short_message():
    with pytest.raises(SizeError) as e:
        parse_size("9" * 5000)
    assert "too many digits" in str(e.value) and len(str(e.value)) < 200
