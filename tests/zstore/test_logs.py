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


def test_key_value_secrets_are_scrubbed_in_every_shape():
    cases = {
        '{"token": "abc123def", "name": "v1"}': '{"token": "***", "name": "v1"}',
        '{"secrets":{"password":"hunter2 two words"}}': '{"secrets":{"password":"***"}}',
        "{'mutual_secret': 'zz-top-secret'}": "{'mutual_secret': '***'}",
        "login user=admin password=hunter22 ok": "login user=admin password=*** ok",
        "GET /x?access_token=abcdef HTTP/1.1": "GET /x?access_token=*** HTTP/1.1",
        'token = "s3cr3t value"': 'token = "***"',
        "client:\n  token: abcdefgh\n  secret: 'x y z'\n": "client:\n  token: ***\n  secret: '***'\n",
        "X-Auth-Token: deadbeef": "X-Auth-Token: ***",
        "{token: abcd, other: 1}": "{token: ***, other: 1}",
    }
    for raw, want in cases.items():
        assert logs.scrub(raw) == want, raw


def test_prose_about_secret_files_keeps_its_reason():
    for msg in ("cannot read token file /etc/zstore/secret/token: No such file or directory",
                "cannot read secret file /run/secrets/password: Permission denied",
                "the token was refused: check client.token_file or $ZSTORE_TOKEN",
                "token file /etc/zstore/token is empty",
                "meta.token_file is required: every API call must carry the cluster token"):
        assert logs.scrub(msg) == msg
