"""CHAP values LIO cannot store are refused (400), not stored for a login that can never
succeed: the kernel reads a value starting with "NULL" as no value, and rtslib strips
surrounding whitespace from what it writes."""

from __future__ import annotations

import pytest

from meta import exports
from tests.meta.helpers import make_ctx
from zstore.errors import InvalidArgument

CHAP = {"target": "*", "initiator": "iqn.2004-10.com.example:h1", "user": "u1", "secret": "supersecret123"}


@pytest.fixture
def ctx(etcd_client, etcd_config):
    return make_ctx(etcd_client, etcd_config)


@pytest.mark.parametrize("field, value, match", [
    ("user", "NULL", "CHAP user name 'NULL': must not start with 'NULL'"),
    ("user", "NULLuser", "must not start with 'NULL'"),
    ("user", " u1", "whitespace"),
    ("user", "u1 ", "whitespace"),
    ("user", "u1\u00a0", "whitespace"),
    ("secret", " supersecret123", "CHAP secret: must not start or end with whitespace"),
    ("secret", "supersecret123 ", "whitespace"),
    ("secret", "NULLsupersecret", "CHAP secret: must not start with 'NULL'"),
    ("mutual_user", "NULL", "mutual CHAP user name 'NULL'"),
    ("mutual_user", " tgt", "whitespace"),
    ("mutual_secret", "othersecret456\t", "mutual CHAP secret: must not start or end with whitespace"),
    ("mutual_secret", "NULLothersecret", "mutual CHAP secret: must not start with 'NULL'"),
])
async def test_values_lio_cannot_store_are_refused(ctx, field, value, match):
    body = {**CHAP, "mutual_user": "tgt", "mutual_secret": "othersecret456", field: value}
    with pytest.raises(InvalidArgument, match=match) as e:
        await exports.set_chap(ctx, body)
    assert e.value.status == 400
    if "secret" in field:
        assert value.strip() not in e.value.message        # a secret is never echoed
    assert await exports.list_chap(ctx) == []


@pytest.mark.parametrize("user", ["null", "Null", "xNULL", "u NULL", "a b"])
async def test_names_that_only_look_alike_are_fine(ctx, user):
    rec = await exports.set_chap(ctx, {**CHAP, "user": user, "secret": "sup3r secret NULL"})
    assert rec.user == user
