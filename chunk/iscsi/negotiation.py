"""Target side of login/text parameter negotiation (RFC 7143 §6.2, §13).

``LoginNegotiator`` consumes the initiator's key=value pairs PDU by PDU and
answers each key by its rule: list (first offered value we accept), numeric
min/max, Boolean AND/OR, or declaration. It enforces the rules that make a
login fail rather than limp on: a key sent twice, a key the initiator may not
send, a missing InitiatorName/TargetName, leading-only keys on a secondary
connection, security keys outside the security stage, a SessionType that
changes the session type after the first text. Unknown keys get
``NotUnderstood``; keys that do not apply to a discovery session ``Irrelevant``;
out-of-range or malformed values ``Reject`` (the default then stays in force).

Security keys (AuthMethod, CHAP_*) are handed back untouched: authentication
is chap.py's business, this module only says where they may appear.
The result is a frozen ``SessionParams`` the connection runs with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .constants import LoginStatus, Stage
from .errors import NegotiationError

Pairs = list[tuple[str, str]]

MIN_SEGMENT = 512
MAX_SEGMENT = (1 << 24) - 1
MAX_ISCSI_NAME = 223
NOT_UNDERSTOOD, IRRELEVANT, REJECT = "NotUnderstood", "Irrelevant", "Reject"
_SPECIAL = frozenset({NOT_UNDERSTOOD, IRRELEVANT, REJECT})
SECURITY_KEY_PREFIXES = ("CHAP_", "SRP_", "KRB_", "SPKM_")


def is_security_key(key: str) -> bool:
    return key == "AuthMethod" or key.startswith(SECURITY_KEY_PREFIXES)


@dataclass(frozen=True)
class TargetPreferences:
    """What this target accepts; each value is the most it will agree to.

    InitialR2T=No and ImmediateData=Yes let writes up to FirstBurstLength go
    out without an R2T round trip; an initiator wanting InitialR2T=Yes still
    gets it (OR), so No is also the most compatible choice.
    """

    header_digests: tuple[str, ...] = ("CRC32C", "None")
    data_digests: tuple[str, ...] = ("CRC32C", "None")
    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 1 << 20
    first_burst_length: int = 65536
    initial_r2t: bool = False
    immediate_data: bool = True
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    default_time2wait: int = 2
    default_time2retain: int = 20
    error_recovery_level: int = 0
    max_connections: int = 1
    iscsi_protocol_level: int = 1
    target_alias: str | None = None

    def __post_init__(self):
        for name, lo, hi in (("max_recv_data_segment_length", MIN_SEGMENT, MAX_SEGMENT),
                             ("max_burst_length", MIN_SEGMENT, MAX_SEGMENT),
                             ("first_burst_length", MIN_SEGMENT, MAX_SEGMENT),
                             ("max_outstanding_r2t", 1, 65535),
                             ("default_time2wait", 0, 3600), ("default_time2retain", 0, 3600),
                             ("error_recovery_level", 0, 0), ("max_connections", 1, 1),
                             ("iscsi_protocol_level", 1, 1)):
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"{name}={getattr(self, name)} outside {lo}..{hi}")
        if self.first_burst_length > self.max_burst_length:
            raise ValueError("first_burst_length exceeds max_burst_length")
        for digests in (self.header_digests, self.data_digests):
            if not digests or not set(digests) <= {"CRC32C", "None"}:
                raise ValueError(f"digests must be from CRC32C, None: {digests}")


@dataclass(frozen=True)
class SessionParams:
    """Negotiated state; defaults are RFC 7143's. Naming is from the target's view:
    ``max_recv_data_segment_length`` bounds PDUs we accept (our declaration),
    ``max_send_data_segment_length`` bounds PDUs we send (the initiator's)."""

    session_type: str = "Normal"
    initiator_name: str = ""
    initiator_alias: str | None = None
    target_name: str | None = None
    header_digest: bool = False
    data_digest: bool = False
    max_recv_data_segment_length: int = 8192
    max_send_data_segment_length: int = 8192
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    initial_r2t: bool = True
    immediate_data: bool = True
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    default_time2wait: int = 2
    default_time2retain: int = 20
    error_recovery_level: int = 0
    max_connections: int = 1
    iscsi_protocol_level: int = 1
    target_portal_group_tag: int | None = None

    @property
    def discovery(self) -> bool:
        return self.session_type == "Discovery"


@dataclass(frozen=True)
class _Rule:
    kind: str            # list | and | or | min | max | declare_num | declare | marker | markint
    attr: str | None = None
    lo: int = 0
    hi: int = 0
    leading_only: bool = False
    discovery_irrelevant: bool = False
    sender: str = "IT"   # who may send it: I, T or IT
    pref: str | None = None   # TargetPreferences attribute with our side's value


_LO, _DI = True, True    # positional leading_only, discovery_irrelevant in the table below
_RULES: dict[str, _Rule] = {
    "HeaderDigest": _Rule("list", "header_digest", pref="header_digests"),
    "DataDigest": _Rule("list", "data_digest", pref="data_digests"),
    "MaxConnections": _Rule("min", "max_connections", 1, 65535, _LO, _DI,
                            pref="max_connections"),
    "InitialR2T": _Rule("or", "initial_r2t", leading_only=True, discovery_irrelevant=True,
                        pref="initial_r2t"),
    "ImmediateData": _Rule("and", "immediate_data", leading_only=True,
                           discovery_irrelevant=True, pref="immediate_data"),
    "MaxRecvDataSegmentLength": _Rule("declare_num", "max_send_data_segment_length",
                                      MIN_SEGMENT, MAX_SEGMENT),
    "MaxBurstLength": _Rule("min", "max_burst_length", MIN_SEGMENT, MAX_SEGMENT, _LO, _DI,
                            pref="max_burst_length"),
    "FirstBurstLength": _Rule("min", "first_burst_length", MIN_SEGMENT, MAX_SEGMENT, _LO, _DI,
                              pref="first_burst_length"),
    "DefaultTime2Wait": _Rule("max", "default_time2wait", 0, 3600, _LO,
                              pref="default_time2wait"),
    "DefaultTime2Retain": _Rule("min", "default_time2retain", 0, 3600, _LO,
                                pref="default_time2retain"),
    "MaxOutstandingR2T": _Rule("min", "max_outstanding_r2t", 1, 65535, _LO, _DI,
                               pref="max_outstanding_r2t"),
    "DataPDUInOrder": _Rule("or", "data_pdu_in_order", leading_only=True,
                            discovery_irrelevant=True, pref="data_pdu_in_order"),
    "DataSequenceInOrder": _Rule("or", "data_sequence_in_order", leading_only=True,
                                 discovery_irrelevant=True, pref="data_sequence_in_order"),
    "ErrorRecoveryLevel": _Rule("min", "error_recovery_level", 0, 2, _LO,
                                pref="error_recovery_level"),
    "iSCSIProtocolLevel": _Rule("min", "iscsi_protocol_level", 0, 31, _LO, _DI,
                                pref="iscsi_protocol_level"),
    "TaskReporting": _Rule("list", None, leading_only=True, discovery_irrelevant=True),
    "InitiatorName": _Rule("declare", "initiator_name", sender="I"),
    "InitiatorAlias": _Rule("declare", "initiator_alias", sender="I"),
    "TargetName": _Rule("declare", "target_name", sender="I"),
    "SessionType": _Rule("declare", "session_type", leading_only=True, sender="I"),
    "TargetAlias": _Rule("declare", sender="T"),
    "TargetAddress": _Rule("declare", sender="T"),
    "TargetPortalGroupTag": _Rule("declare", sender="T"),
    "SendTargets": _Rule("declare", sender="I"),       # full feature phase only
    # Obsoleted by RFC 7143 §13.25: answer No / Reject, never NotUnderstood.
    "IFMarker": _Rule("marker"), "OFMarker": _Rule("marker"),
    "IFMarkInt": _Rule("markint"), "OFMarkInt": _Rule("markint"),
}
# Declaratives that steer how everything else is answered: handle them first.
_FIRST = ("SessionType", "InitiatorName", "TargetName", "MaxBurstLength")
_TASK_REPORTING = ("RFC3720",)


def _number(value: str) -> int | None:
    """RFC 7143 numerical value: decimal-constant or hex-constant (0x...)."""
    if value[:2] in ("0x", "0X"):
        digits = value[2:]
        if digits and all(c in "0123456789abcdefABCDEF" for c in digits):
            return int(digits, 16)
        return None
    return int(value) if value.isdigit() and value.isascii() else None


def _is_iscsi_name(value: str) -> bool:
    return (0 < len(value.encode()) <= MAX_ISCSI_NAME
            and value[:4].lower() in ("iqn.", "eui.", "naa.") and len(value) > 4)


class LoginNegotiator:
    """Negotiation state of one connection's login. Feed it each complete text
    (after C-bit reassembly) with the login stage it arrived in."""

    def __init__(self, prefs: TargetPreferences | None = None, *, leading: bool = True,
                 target_portal_group_tag: int = 1, session: SessionParams | None = None):
        self.prefs = prefs or TargetPreferences()
        self.leading = leading
        self.tpgt = target_portal_group_tag
        self._values: dict[str, object] = dataclasses.asdict(session or SessionParams())
        self._seen: set[str] = set()
        self._pending: dict[str, str] = {}   # our offers awaiting the initiator's answer
        self._first = True
        self._declared_mrdsl = False

    # -- public API -------------------------------------------------------------

    @property
    def discovery(self) -> bool:
        return self._values["session_type"] == "Discovery"

    def process(self, pairs: Pairs, stage: Stage) -> tuple[Pairs, Pairs]:
        """Answer one text. Returns (response pairs, security pairs for the authenticator)."""
        response: Pairs = []
        security: Pairs = []
        keys = [k for k, _ in pairs]
        for k in keys:
            if keys.count(k) > 1 or (k in self._seen and k not in self._pending):
                raise NegotiationError(f"key {k} sent more than once")
        first = sorted(range(len(pairs)), key=lambda i: (
            _FIRST.index(pairs[i][0]) if pairs[i][0] in _FIRST else len(_FIRST), i))
        answers: dict[int, str | None] = {}
        for i in first:
            key, value = pairs[i]
            self._seen.add(key)
            if key in self._pending:
                self._take_answer(key, value)
                answers[i] = None
                continue
            if is_security_key(key):
                if stage != Stage.SECURITY:
                    raise NegotiationError(f"{key} outside the security negotiation stage")
                security.append((key, value))
                answers[i] = None
                continue
            if value in _SPECIAL:
                raise NegotiationError(f"{key}={value} is an answer, not an offer")
            answers[i] = self._answer(key, value)
        self._check_bursts()
        if self._first:
            self._check_first_pdu()
            if "TargetName" in self._seen:
                response.append(("TargetPortalGroupTag", str(self.tpgt)))
                self._values["target_portal_group_tag"] = self.tpgt
                if self.prefs.target_alias:
                    response.append(("TargetAlias", self.prefs.target_alias))
            self._first = False
        for i, (key, _) in enumerate(pairs):
            answer = answers.get(i)
            if answer is not None:
                response.append((key, answer))
            elif key == "MaxRecvDataSegmentLength" and not self._declared_mrdsl:
                response.append(self._declare_mrdsl())
        return response, security

    def offers(self) -> Pairs:
        """Keys the target must send before leaving operational negotiation:
        our MaxRecvDataSegmentLength, and offers where the RFC default is more
        than we accept and the initiator never raised the key. Non-declarative
        offers need the initiator's answer (feed it to ``process``).

        FirstBurstLength is offered at most the MaxBurstLength in force: an initiator
        that lowered only MaxBurstLength below the default FirstBurstLength is told the
        smaller first burst (RFC 7143 §13.14), not held to one it never heard of."""
        out: Pairs = []
        if not self._declared_mrdsl:
            out.append(self._declare_mrdsl())
        p = self.prefs
        first_burst = min(p.first_burst_length, self._values["max_burst_length"])
        wanted = [("HeaderDigest", "None" not in p.header_digests, "CRC32C"),
                  ("DataDigest", "None" not in p.data_digests, "CRC32C"),
                  ("ImmediateData", not p.immediate_data, "No"),
                  ("MaxBurstLength", p.max_burst_length < 262144, str(p.max_burst_length)),
                  ("FirstBurstLength", first_burst < 65536, str(first_burst)),
                  ("DefaultTime2Wait", p.default_time2wait > 2, str(p.default_time2wait)),
                  ("DefaultTime2Retain", p.default_time2retain < 20,
                   str(p.default_time2retain))]
        for key, needed, value in wanted:
            rule = _RULES[key]
            if not needed or key in self._seen or key in self._pending:
                continue
            if (rule.discovery_irrelevant and self.discovery) or (
                    rule.leading_only and not self.leading):
                continue
            self._pending[key] = value
            out.append((key, value))
        return out

    @property
    def awaiting_answers(self) -> bool:
        return bool(self._pending)

    def params(self) -> SessionParams:
        v = dict(self._values)
        v["max_recv_data_segment_length"] = self.prefs.max_recv_data_segment_length \
            if self._declared_mrdsl else v["max_recv_data_segment_length"]
        return SessionParams(**v)

    # -- rules --------------------------------------------------------------------

    def _declare_mrdsl(self) -> tuple[str, str]:
        self._declared_mrdsl = True
        return ("MaxRecvDataSegmentLength", str(self.prefs.max_recv_data_segment_length))

    def _check_bursts(self) -> None:
        """RFC 7143 §13.14: FirstBurstLength MUST NOT exceed MaxBurstLength. Within one text
        the FirstBurstLength answer is held to MaxBurstLength, and one never raised is offered
        no more (``offers``). Agreed in an earlier text and then above a smaller
        MaxBurstLength, it cannot be negotiated again (§6.2): the initiator's own offers
        broke the rule, and the login fails rather than run with a value it was not told."""
        fbl, mbl = self._values["first_burst_length"], self._values["max_burst_length"]
        if fbl > mbl and "FirstBurstLength" in self._seen and "FirstBurstLength" not in self._pending:
            raise NegotiationError(f"FirstBurstLength={fbl} agreed exceeds MaxBurstLength={mbl}")

    def _check_first_pdu(self) -> None:
        if "InitiatorName" not in self._seen:
            raise NegotiationError("first Login Request lacks InitiatorName",
                                   LoginStatus.MISSING_PARAMETER)
        if self._values["session_type"] == "Normal" and "TargetName" not in self._seen:
            raise NegotiationError("normal session login lacks TargetName",
                                   LoginStatus.MISSING_PARAMETER)

    def _answer(self, key: str, value: str) -> str | None:
        rule = _RULES.get(key)
        if rule is None:
            return NOT_UNDERSTOOD          # includes X-/X# extension keys
        if rule.sender == "T":
            raise NegotiationError(f"{key} may only be sent by a target")
        if rule.leading_only and not self.leading:
            raise NegotiationError(f"{key} is leading-connection only")
        kind = rule.kind
        if kind == "declare":
            return self._declaration(key, value)
        if kind == "marker":
            return "No"
        if kind == "markint":
            return REJECT
        if rule.discovery_irrelevant and self.discovery:
            return IRRELEVANT
        ours = getattr(self.prefs, rule.pref) if rule.pref else None
        if kind == "list":
            accepted = ours if ours is not None else _TASK_REPORTING
            choice = next((x for x in value.split(",") if x in accepted), None)
            if choice is None:
                return REJECT
            if rule.attr:
                self._values[rule.attr] = choice == "CRC32C"
            return choice
        if kind in ("and", "or"):
            if value not in ("Yes", "No"):
                return REJECT
            theirs = value == "Yes"
            result = (theirs and ours) if kind == "and" else (theirs or ours)
            self._values[rule.attr] = result
            return "Yes" if result else "No"
        n = _number(value)
        if n is None or not rule.lo <= n <= rule.hi:
            return REJECT
        if kind == "declare_num":
            self._values[rule.attr] = n
            return None                    # answered by our own declaration
        if kind == "min":
            result = min(n, ours)
            if key == "FirstBurstLength":
                result = min(result, self._values["max_burst_length"])
        else:
            result = max(n, ours)
        self._values[rule.attr] = result
        return str(result)

    def _declaration(self, key: str, value: str) -> str | None:
        if key == "SendTargets":
            return IRRELEVANT              # only meaningful in full feature phase
        if key == "SessionType":
            if value not in ("Normal", "Discovery"):
                raise NegotiationError(f"SessionType={value[:32]!r}",
                                       LoginStatus.SESSION_TYPE_NOT_SUPPORTED)
            if not self._first and value != self._values["session_type"]:
                # Admission (target, redirect, CHAP) was decided on the first text's
                # session type; a later change would skip the checks of the new type.
                raise NegotiationError(f"SessionType={value} after the first Login Request "
                                       f"made the session {self._values['session_type']}")
        elif key in ("InitiatorName", "TargetName"):
            if not _is_iscsi_name(value):
                raise NegotiationError(f"{key} is not an iSCSI name: {value[:64]!r}")
        self._values[_RULES[key].attr] = value
        return None

    def _take_answer(self, key: str, value: str) -> None:
        """The initiator's answer to one of our offers (see ``offers``)."""
        offered = self._pending.pop(key)
        rule = _RULES[key]
        ok = False
        if rule.kind == "list":
            ok = value == offered
            if ok:
                self._values[rule.attr] = value == "CRC32C"
        elif rule.kind == "and":           # we offered No: the outcome is No whatever they say
            ok = value in ("Yes", "No")
            self._values[rule.attr] = False
        else:
            n = _number(value)
            mine = int(offered)
            ok = n is not None and rule.lo <= n <= rule.hi and (
                n <= mine if rule.kind == "min" else n >= mine)
            if ok:
                self._values[rule.attr] = n
        if not ok:
            raise NegotiationError(f"unacceptable answer {key}={value[:32]!r} to our offer")


def negotiate_full_feature(pairs: Pairs, params: SessionParams) -> tuple[Pairs, SessionParams, Pairs]:
    """One Text Request's keys in full feature phase.

    Only keys usable in any phase (RFC 7143 "Use: ALL") may change there:
    MaxRecvDataSegmentLength and InitiatorAlias. SendTargets is returned as a
    request for the caller to answer; login-only keys get Reject. A declared
    MaxRecvDataSegmentLength is answered with the target's own declaration (the one
    the session runs with). Returns (response pairs, new params, requests).
    """
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise NegotiationError("key sent twice in one text negotiation")
    response: Pairs = []
    requests: Pairs = []
    changes: dict[str, object] = {}
    for key, value in pairs:
        rule = _RULES.get(key)
        if key == "SendTargets":
            requests.append((key, value))
        elif rule is None:
            response.append((key, NOT_UNDERSTOOD))
        elif rule.sender == "T":
            raise NegotiationError(f"{key} may only be sent by a target")
        elif key == "MaxRecvDataSegmentLength":
            n = _number(value)
            if n is None or not MIN_SEGMENT <= n <= MAX_SEGMENT:
                response.append((key, REJECT))
            else:
                changes["max_send_data_segment_length"] = n
                response.append((key, str(params.max_recv_data_segment_length)))
        elif key == "InitiatorAlias":
            changes["initiator_alias"] = value
        else:
            response.append((key, REJECT))
    return response, dataclasses.replace(params, **changes), requests
