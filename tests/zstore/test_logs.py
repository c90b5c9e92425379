import logging

from zstore import logs


def test_registered_secrets_and_patterns_are_scrubbed(caplog):
    logs.redact("tok-abcdefgh-1234")
    handler_filter = logs.RedactingFilter()
    rec = logging.LogRecord("x", logging.INFO, __file__, 1,
                            "call with %s and secret=hunter2hunter2 Authorization: Bearer zzz", ("tok-abcdefgh-1234",), None)
    handler_filter.filter(rec)
    msg = rec.getMessage()
    assert "tok-abcdefgh-1234" not in msg and "hunter2hunter2" not in msg and "zzz" not in msg
    assert msg.count("***") == 3


def test_exception_text_is_scrubbed():
    logs.redact("very-secret-value")
    try:
        raise ValueError("boom very-secret-value")
    except ValueError:
        import sys
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    logs.RedactingFilter().filter(rec)
    assert "very-secret-value" not in rec.exc_text and "boom ***" in rec.exc_text
