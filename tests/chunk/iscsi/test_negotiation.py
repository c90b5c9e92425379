"""Login/text negotiation: one test per RFC 7143 key rule, plus the failure rules."""

from __future__ import annotations

import pytest

from chunk.iscsi.constants import LoginStatus, Stage
from chunk.iscsi.errors import NegotiationError
from chunk.iscsi.negotiation import (LoginNegotiator, SessionParams, TargetPreferences,
                                     negotiate_full_feature)
from chunk.iscsi.pdu import decode_pdu
from chunk.iscsi.text import decode_text

from .test_pdu import LIBISCSI_LOGIN

OP = Stage.OPERATIONAL
INIT = [("InitiatorName", "iqn.2024-01.test:init"), ("TargetName", "iqn.2024-01.test:tgt")]


def negotiate(*pairs, prefs=None, **kw):
    """Run a normal-session first PDU carrying ``pairs``; return (answers dict, params)."""
    n = LoginNegotiator(prefs, **kw)
    response, security = n.process(INIT + list(pairs), OP)
    assert security == []
    return dict(response), n.params()


# --- list keys -------------------------------------------------------------------

@pytest.mark.parametrize("key,attr", [("HeaderDigest", "header_digest"),
                                      ("DataDigest", "data_digest")])
def test_digest_list_takes_first_offered_value_we_accept(key, attr):
    answers, params = negotiate((key, "CRC32C,None"))
    assert answers[key] == "CRC32C" and getattr(params, attr) is True
    answers, params = negotiate((key, "None,CRC32C"))
    assert answers[key] == "None" and getattr(params, attr) is False
    answers, params = negotiate((key, "MD5,CRC32C"))          # unknown values are skipped
    assert answers[key] == "CRC32C"


def test_digest_list_with_nothing_acceptable_is_rejected():
    prefs = TargetPreferences(header_digests=("None",))
    answers, params = negotiate(("HeaderDigest", "CRC32C"), prefs=prefs)
    assert answers["HeaderDigest"] == "Reject" and params.header_digest is False


def test_task_reporting_list():
    assert negotiate(("TaskReporting", "FastAbort,RFC3720"))[0]["TaskReporting"] == "RFC3720"
    assert negotiate(("TaskReporting", "FastAbort"))[0]["TaskReporting"] == "Reject"


# --- numeric min/max -------------------------------------------------------------

def test_max_burst_length_is_min_of_both_sides():
    answers, params = negotiate(("MaxBurstLength", "16776192"))
    assert answers["MaxBurstLength"] == str(1 << 20) and params.max_burst_length == 1 << 20
    answers, params = negotiate(("MaxBurstLength", "4096"))
    assert answers["MaxBurstLength"] == "4096" and params.max_burst_length == 4096


def test_first_burst_is_min_and_never_above_max_burst():
    answers, params = negotiate(("FirstBurstLength", "262144"))
    assert answers["FirstBurstLength"] == "65536" and params.first_burst_length == 65536
    # FirstBurstLength listed before MaxBurstLength still respects the smaller MaxBurst
    answers, params = negotiate(("FirstBurstLength", "65536"), ("MaxBurstLength", "8192"))
    assert answers == {"FirstBurstLength": "8192", "MaxBurstLength": "8192",
                       "TargetPortalGroupTag": "1"}
    assert params.first_burst_length == params.max_burst_length == 8192


@pytest.mark.parametrize("key,offer,answer,attr,expected", [
    ("MaxOutstandingR2T", "8", "1", "max_outstanding_r2t", 1),
    ("DefaultTime2Retain", "0", "0", "default_time2retain", 0),
    ("DefaultTime2Retain", "60", "20", "default_time2retain", 20),
    ("ErrorRecoveryLevel", "2", "0", "error_recovery_level", 0),
    ("MaxConnections", "4", "1", "max_connections", 1),
    ("iSCSIProtocolLevel", "2", "1", "iscsi_protocol_level", 1),
    ("DefaultTime2Wait", "0", "2", "default_time2wait", 2),          # max, not min
    ("DefaultTime2Wait", "10", "10", "default_time2wait", 10),
    ("MaxBurstLength", "0x2000", "8192", "max_burst_length", 8192),  # hex-constant
])
def test_numeric_rules(key, offer, answer, attr, expected):
    answers, params = negotiate((key, offer))
    assert answers[key] == answer and getattr(params, attr) == expected


def test_max_outstanding_r2t_honours_our_larger_limit():
    answers, params = negotiate(("MaxOutstandingR2T", "2"),
                                prefs=TargetPreferences(max_outstanding_r2t=4))
    assert answers["MaxOutstandingR2T"] == "2" and params.max_outstanding_r2t == 2


@pytest.mark.parametrize("key,bad", [
    ("MaxBurstLength", "511"), ("MaxBurstLength", str(1 << 24)), ("FirstBurstLength", "12a"),
    ("MaxOutstandingR2T", "0"), ("DefaultTime2Wait", "3601"), ("DefaultTime2Retain", "-1"),
    ("ErrorRecoveryLevel", "3"), ("MaxConnections", "0"), ("MaxConnections", " 1"),
    ("MaxRecvDataSegmentLength", "100"), ("MaxBurstLength", "0x"), ("MaxBurstLength", "١٢"),
])
def test_out_of_range_or_malformed_numbers_are_rejected_and_default_kept(key, bad):
    answers, params = negotiate((key, bad))
    assert answers[key] == "Reject"
    assert params == dataclass_defaults_except_names(params)


def dataclass_defaults_except_names(params: SessionParams) -> SessionParams:
    import dataclasses
    return dataclasses.replace(SessionParams(), initiator_name=params.initiator_name,
                               target_name=params.target_name, target_portal_group_tag=1,
                               max_recv_data_segment_length=params.max_recv_data_segment_length)


# --- Boolean AND/OR --------------------------------------------------------------

@pytest.mark.parametrize("pref,offer,result", [
    (False, "Yes", "Yes"), (False, "No", "No"), (True, "No", "Yes"), (True, "Yes", "Yes")])
def test_initial_r2t_is_or(pref, offer, result):
    answers, params = negotiate(("InitialR2T", offer),
                                prefs=TargetPreferences(initial_r2t=pref))
    assert answers["InitialR2T"] == result and params.initial_r2t == (result == "Yes")


@pytest.mark.parametrize("pref,offer,result", [
    (True, "Yes", "Yes"), (True, "No", "No"), (False, "Yes", "No"), (False, "No", "No")])
def test_immediate_data_is_and(pref, offer, result):
    answers, params = negotiate(("ImmediateData", offer),
                                prefs=TargetPreferences(immediate_data=pref))
    assert answers["ImmediateData"] == result and params.immediate_data == (result == "Yes")


@pytest.mark.parametrize("key", ["DataPDUInOrder", "DataSequenceInOrder"])
def test_in_order_keys_are_or(key):
    assert negotiate((key, "No"))[0][key] == "Yes"         # we insist on in-order
    relaxed = TargetPreferences(**{"data_pdu_in_order": False, "data_sequence_in_order": False})
    assert negotiate((key, "No"), prefs=relaxed)[0][key] == "No"


def test_bad_boolean_is_rejected():
    answers, params = negotiate(("ImmediateData", "yes"))
    assert answers["ImmediateData"] == "Reject" and params.immediate_data is True


# --- declarations ----------------------------------------------------------------

def test_declarations_are_recorded_not_answered():
    n = LoginNegotiator(TargetPreferences(target_alias="zstore t0001"),
                        target_portal_group_tag=7)
    response, _ = n.process(INIT + [("InitiatorAlias", "host-a"), ("SessionType", "Normal"),
                                    ("MaxRecvDataSegmentLength", "65536")], OP)
    assert response == [("TargetPortalGroupTag", "7"), ("TargetAlias", "zstore t0001"),
                        ("MaxRecvDataSegmentLength", "262144")]
    p = n.params()
    assert (p.initiator_name, p.target_name, p.initiator_alias) == (
        "iqn.2024-01.test:init", "iqn.2024-01.test:tgt", "host-a")
    assert p.target_portal_group_tag == 7 and p.session_type == "Normal"
    assert p.max_send_data_segment_length == 65536        # the initiator's declaration
    assert p.max_recv_data_segment_length == 262144       # ours


def test_our_mrdsl_is_declared_exactly_once():
    n = LoginNegotiator()
    n.process(INIT, OP)
    assert n.offers() == [("MaxRecvDataSegmentLength", "262144")]
    assert n.offers() == []
    response, _ = n.process([("MaxRecvDataSegmentLength", "8192")], OP)
    assert response == []                                  # already declared


def test_unknown_and_extension_keys_are_not_understood():
    answers, _ = negotiate(("FooBar", "1"), ("X-com.example.thing", "on"), ("X#org.k", "1"))
    assert answers["FooBar"] == answers["X-com.example.thing"] == answers["X#org.k"] \
        == "NotUnderstood"


def test_obsolete_marker_keys():
    answers, _ = negotiate(("IFMarker", "No"), ("OFMarker", "Yes"), ("OFMarkInt", "1~65535"),
                           ("IFMarkInt", "2048"))
    assert (answers["IFMarker"], answers["OFMarker"]) == ("No", "No")
    assert answers["OFMarkInt"] == answers["IFMarkInt"] == "Reject"


def test_discovery_session_marks_session_keys_irrelevant():
    req, _ = decode_pdu(LIBISCSI_LOGIN)
    n = LoginNegotiator()
    response, security = n.process(decode_text(req.data), OP)
    answers = dict(response)
    for key in ("InitialR2T", "ImmediateData", "MaxBurstLength", "FirstBurstLength",
                "MaxOutstandingR2T", "MaxConnections", "DataPDUInOrder", "DataSequenceInOrder"):
        assert answers[key] == "Irrelevant", key
    assert answers["ErrorRecoveryLevel"] == "0" and answers["DefaultTime2Wait"] == "2"
    assert "TargetPortalGroupTag" not in answers            # no TargetName in discovery
    p = n.params()
    assert p.discovery and p.initiator_name.endswith(":iscsi-ls")
    assert p.max_send_data_segment_length == 262144 and p.default_time2retain == 0


def test_libiscsi_normal_login_full_response():
    """The keys `iscsi-inq` sends on a normal session, answered in order."""
    pairs = INIT + [("SessionType", "Normal"), ("HeaderDigest", "None,CRC32C"),
                    ("DataDigest", "None"), ("InitialR2T", "No"), ("ImmediateData", "Yes"),
                    ("MaxBurstLength", "262144"), ("FirstBurstLength", "262144"),
                    ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"),
                    ("MaxOutstandingR2T", "1"), ("ErrorRecoveryLevel", "0"),
                    ("IFMarker", "No"), ("OFMarker", "No"), ("MaxConnections", "1"),
                    ("MaxRecvDataSegmentLength", "262144"), ("DataPDUInOrder", "Yes"),
                    ("DataSequenceInOrder", "Yes")]
    n = LoginNegotiator()
    response, _ = n.process(pairs, OP)
    assert response == [
        ("TargetPortalGroupTag", "1"), ("HeaderDigest", "None"), ("DataDigest", "None"),
        ("InitialR2T", "No"), ("ImmediateData", "Yes"), ("MaxBurstLength", "262144"),
        ("FirstBurstLength", "65536"), ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"),
        ("MaxOutstandingR2T", "1"), ("ErrorRecoveryLevel", "0"), ("IFMarker", "No"),
        ("OFMarker", "No"), ("MaxConnections", "1"), ("MaxRecvDataSegmentLength", "262144"),
        ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes")]
    assert n.offers() == []
    p = n.params()
    assert (p.initial_r2t, p.immediate_data, p.max_burst_length, p.first_burst_length) == (
        False, True, 262144, 65536)


# --- rules that fail the login ---------------------------------------------------

def _fails(pairs, status=LoginStatus.INITIATOR_ERROR, stage=OP, **kw):
    with pytest.raises(NegotiationError) as e:
        LoginNegotiator(**kw).process(pairs, stage)
    assert e.value.status == status
    return e.value


def test_key_twice_in_one_pdu_is_a_protocol_error():
    _fails(INIT + [("MaxBurstLength", "8192"), ("MaxBurstLength", "8192")])


def test_key_twice_across_pdus_is_a_protocol_error():
    n = LoginNegotiator()
    n.process(INIT + [("ImmediateData", "Yes")], OP)
    with pytest.raises(NegotiationError):
        n.process([("ImmediateData", "No")], OP)


def test_missing_initiator_name():
    _fails([("TargetName", "iqn.2024-01.test:tgt")], LoginStatus.MISSING_PARAMETER)


def test_normal_session_needs_target_name():
    _fails([("InitiatorName", "iqn.2024-01.test:init")], LoginStatus.MISSING_PARAMETER)


def test_discovery_session_needs_no_target_name():
    n = LoginNegotiator()
    assert n.process([("InitiatorName", "iqn.2024-01.test:i"), ("SessionType", "Discovery")],
                     OP) == ([], [])


def test_unsupported_session_type():
    _fails(INIT + [("SessionType", "Admin")], LoginStatus.SESSION_TYPE_NOT_SUPPORTED)


@pytest.mark.parametrize("name", ["", "host1", "iqn.", "iqn." + "a" * 220])
def test_invalid_iscsi_names(name):
    _fails([("InitiatorName", name), ("TargetName", "iqn.2024-01.test:tgt")])


@pytest.mark.parametrize("key,value", [("TargetAlias", "x"), ("TargetPortalGroupTag", "1"),
                                       ("TargetAddress", "10.0.0.1:3260,1")])
def test_target_only_keys_from_initiator(key, value):
    _fails(INIT + [(key, value)])


@pytest.mark.parametrize("value", ["Reject", "Irrelevant", "NotUnderstood"])
def test_answer_constants_are_not_offers(value):
    _fails(INIT + [("HeaderDigest", value)])


@pytest.mark.parametrize("key,value", [("SessionType", "Normal"), ("MaxBurstLength", "8192"),
                                       ("ImmediateData", "No"), ("ErrorRecoveryLevel", "0")])
def test_leading_only_keys_on_a_secondary_connection(key, value):
    _fails(INIT + [(key, value)], leading=False, session=SessionParams(
        initiator_name="iqn.2024-01.test:init", target_name="iqn.2024-01.test:tgt"))


def test_secondary_connection_may_negotiate_connection_keys():
    n = LoginNegotiator(leading=False)
    response, _ = n.process(INIT + [("HeaderDigest", "CRC32C"),
                                    ("MaxRecvDataSegmentLength", "16384")], OP)
    assert response == [("TargetPortalGroupTag", "1"), ("HeaderDigest", "CRC32C"),
                        ("MaxRecvDataSegmentLength", "262144")]


def test_security_keys_go_to_the_authenticator_only_in_security_stage():
    n = LoginNegotiator()
    response, security = n.process(INIT + [("AuthMethod", "CHAP,None"),
                                           ("MaxBurstLength", "8192")], Stage.SECURITY)
    assert security == [("AuthMethod", "CHAP,None")]
    assert ("MaxBurstLength", "8192") in response
    _, security = n.process([("CHAP_A", "5")], Stage.SECURITY)
    assert security == [("CHAP_A", "5")]
    with pytest.raises(NegotiationError):
        n.process([("CHAP_N", "user")], OP)


# --- target offers ---------------------------------------------------------------

def test_target_offers_what_the_default_would_exceed():
    prefs = TargetPreferences(immediate_data=False, max_burst_length=65536,
                              first_burst_length=16384, header_digests=("CRC32C",))
    n = LoginNegotiator(prefs)
    n.process(INIT + [("MaxRecvDataSegmentLength", "8192")], OP)
    offers = n.offers()
    assert offers == [("HeaderDigest", "CRC32C"), ("ImmediateData", "No"),
                      ("MaxBurstLength", "65536"), ("FirstBurstLength", "16384")]
    assert n.awaiting_answers
    n.process([("HeaderDigest", "CRC32C"), ("ImmediateData", "Yes"),
               ("MaxBurstLength", "32768"), ("FirstBurstLength", "16384")], OP)
    assert not n.awaiting_answers and n.offers() == []
    p = n.params()
    assert (p.header_digest, p.immediate_data, p.max_burst_length, p.first_burst_length) == (
        True, False, 32768, 16384)


@pytest.mark.parametrize("answer", [("MaxBurstLength", "131072"),     # above our offer
                                    ("MaxBurstLength", "NotUnderstood"),
                                    ("MaxBurstLength", "Reject")])
def test_bad_answers_to_our_offers(answer):
    n = LoginNegotiator(TargetPreferences(max_burst_length=65536, first_burst_length=65536))
    n.process(INIT, OP)
    assert ("MaxBurstLength", "65536") in n.offers()
    with pytest.raises(NegotiationError):
        n.process([answer], OP)


def test_no_offers_for_keys_irrelevant_to_discovery():
    n = LoginNegotiator(TargetPreferences(immediate_data=False))
    n.process([("InitiatorName", "iqn.2024-01.test:i"), ("SessionType", "Discovery")], OP)
    assert n.offers() == [("MaxRecvDataSegmentLength", "262144")]


# --- full feature phase ----------------------------------------------------------

def test_full_feature_text_negotiation():
    params = SessionParams(initiator_name="iqn.2024-01.test:init", target_name="t")
    response, new, requests = negotiate_full_feature(
        [("SendTargets", "All"), ("MaxRecvDataSegmentLength", "16384"),
         ("InitialR2T", "Yes"), ("X-vendor.key", "1"), ("InitiatorAlias", "renamed")], params)
    assert requests == [("SendTargets", "All")]
    assert response == [("MaxRecvDataSegmentLength", "8192"), ("InitialR2T", "Reject"),
                        ("X-vendor.key", "NotUnderstood")]
    assert new.max_send_data_segment_length == 16384 and new.initiator_alias == "renamed"
    assert params.max_send_data_segment_length == 8192          # frozen, untouched


def test_full_feature_rule_breaks():
    with pytest.raises(NegotiationError):
        negotiate_full_feature([("TargetAlias", "x")], SessionParams())
    with pytest.raises(NegotiationError):
        negotiate_full_feature([("SendTargets", "All"), ("SendTargets", "All")],
                               SessionParams())
    response, _, _ = negotiate_full_feature([("MaxRecvDataSegmentLength", "1")],
                                            SessionParams())
    assert response == [("MaxRecvDataSegmentLength", "Reject")]


def test_preferences_are_validated():
    with pytest.raises(ValueError):
        TargetPreferences(first_burst_length=1 << 20, max_burst_length=65536)
    with pytest.raises(ValueError):
        TargetPreferences(max_recv_data_segment_length=100)
    with pytest.raises(ValueError):
        TargetPreferences(error_recovery_level=1)           # we implement level 0 only
    with pytest.raises(ValueError):
        TargetPreferences(header_digests=("MD5",))
