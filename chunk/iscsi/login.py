"""Target side of the iSCSI login phase (RFC 7143 §6.3, §11.12, §11.13).

``login()`` drives one connection from its first Login Request to the final
Login Response and hands back what the full feature phase needs
(``LoginResult``), or answers with a failure/redirect status and closes.
It holds no policy: which targets exist, who must authenticate with which
CHAP secret, and whether to redirect come from a ``LoginPolicy``.

Decisions worth knowing (each is also noted where it is implemented):

* StatSN starts at the first request's ExpStatSN (any start is legal; this is
  what the UNH target does and what a sloppy initiator expects) and grows by
  one per Login Response, as RFC 7143 §11.13.4 and Linux LIO do.
* From the security stage we always select the operational stage as NSG,
  even when the initiator asked for full feature phase (the RFC lets the
  target pick a lower NSG; LIO does the same). Our declarations, e.g.
  MaxRecvDataSegmentLength, can then always be sent before the final response.
* No CHAP required but the initiator offers only CHAP: we answer
  ``AuthMethod=Reject`` (the list-negotiation rule, §6.2.1) and let the
  initiator decide; if it still transits, the login proceeds unauthenticated,
  which is what the policy allows. A conforming initiator closes instead.
* Nonzero TSIH (adding or reinstating a connection) fails with 0x020A: we
  negotiate MaxConnections=1 and ErrorRecoveryLevel=0, so no session ever has
  room for another connection. Session reinstatement (TSIH 0, same ISID) is
  the caller's business: ``LoginResult`` carries the ISID and names for it.
* Bytes that do not frame as a PDU, EOF and timeouts get no answer: the
  connection is simply closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from . import pdu as P
from .chap import ChapCredentials, ChapTarget, select_auth_method
from .constants import ISCSI_VERSION, LoginStatus, Stage
from .errors import AuthenticationError, LoginError, ProtocolError, TextError
from .negotiation import LoginNegotiator, SessionParams, TargetPreferences
from .text import Pairs, TextAssembler, encode_text, split_text

log = logging.getLogger(__name__)

SERIAL_MASK = 0xFFFFFFFF
WINDOW = 128                    # default command window: MaxCmdSN = ExpCmdSN + window - 1
LOGIN_SEGMENT = 8192            # MaxRecvDataSegmentLength in force during login (§6.1)
PDU_TIMEOUT = 30.0
LOGIN_DEADLINE = 60.0
MAX_LOGIN_PDUS = 64
CLOSE_LINGER = 0.5


class ChapSecrets(Protocol):
    """CHAP configuration for one initiator/target pair (never logged)."""

    user: str
    secret: str | bytes
    mutual_user: str | None
    mutual_secret: str | bytes | None


class LoginPolicy(Protocol):
    """What login asks the cluster. Implemented over the catalog (and by the redirector)."""

    def target_exists(self, target_iqn: str) -> bool:
        """Any method may raise LoginError to refuse with its status, e.g. 0x0301 (service
        unavailable, which initiators retry) while the policy's own state is still loading."""
        ...

    def chap_for(self, target_iqn: str | None, initiator: str) -> ChapSecrets | None:
        """Credentials the initiator must prove, None if no CHAP is required.
        ``target_iqn`` is None for discovery sessions."""
        ...

    def redirect(self, initiator: str, target_iqn: str | None) -> str | None:
        """"host:port" to send the initiator to, None to serve it here."""
        ...

    def new_tsih(self) -> int:
        """A nonzero 16-bit session handle, unique among this portal group's sessions."""
        ...


@dataclass(frozen=True)
class LoginResult:
    params: SessionParams           # includes initiator_name, target_name, session_type
    isid: bytes
    tsih: int
    cid: int
    statsn: int                     # StatSN of the first response after the final Login Response
    expcmdsn: int                   # CmdSN of the login requests: login does not advance it


class _Close(Exception):
    """End the login without a response (EOF, timeout, unframed bytes)."""


class _Probed(_Close):
    """Closed before a first byte: a TCP health check (the redirector probes every portal
    every 2 s), not a failed login worth an INFO line each time."""


class _Redirect(Exception):
    def __init__(self, address: str):
        super().__init__(address)
        self.address = address


async def login(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, policy: LoginPolicy,
                prefs: TargetPreferences, *, tpgt: int = 1, first_pdu_timeout: float = 10.0,
                pdu_timeout: float = PDU_TIMEOUT, deadline: float = LOGIN_DEADLINE,
                max_pdus: int = MAX_LOGIN_PDUS, window: int = WINDOW) -> LoginResult | None:
    """Run the login phase on a fresh connection.

    Returns the result after sending the final Login Response, or None after
    answering with a failure or redirect status (or on EOF, timeout, garbage);
    the connection is then closed. Nothing an initiator sends makes it raise.
    ``deadline`` bounds the whole login and ``max_pdus`` its requests, so a
    slow or malicious client cannot hold the connection.
    """
    state = _Login(reader, writer, policy, prefs, tpgt, pdu_timeout, deadline, max_pdus, window)
    try:
        return await state.run(first_pdu_timeout)
    except _Redirect as r:
        log.info("login from %s redirected to %s", state.who, r.address)
        await state.fail(LoginStatus.TARGET_MOVED_TEMPORARILY, [("TargetAddress", r.address)])
    except LoginError as e:
        log.info("login from %s refused (%s): %s", state.who, _status_name(e.status), e)
        await state.fail(e.status)
    except _Probed as e:
        log.debug("login from %s dropped: %s", state.who, e)
    except _Close as e:
        log.info("login from %s dropped: %s", state.who, e)
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
        log.info("login from %s: connection lost or stuck: %r", state.who, e)
    except Exception:  # noqa: BLE001 - a bug or a policy outage must not kill the portal
        log.exception("login from %s failed", state.who)
        await state.fail(LoginStatus.TARGET_ERROR)
    await _close(reader, writer)
    return None


class _Login:
    """State of one connection's login: stage, sequence numbers, negotiator, CHAP."""

    def __init__(self, reader, writer, policy: LoginPolicy, prefs: TargetPreferences,
                 tpgt: int, pdu_timeout: float, deadline: float, max_pdus: int, window: int = WINDOW):
        self.r, self.w, self.policy = reader, writer, policy
        self.window = max(1, window)    # the session's command window: what MaxCmdSN grants
        self.neg = LoginNegotiator(prefs, leading=True, target_portal_group_tag=tpgt)
        self.pdu_timeout, self.max_pdus = pdu_timeout, max_pdus
        self.deadline = time.monotonic() + deadline
        self.peer = writer.get_extra_info("peername")
        self.first: P.LoginRequest | None = None
        self.stage = Stage.SECURITY
        self.statsn = 0
        self.pdus = 0
        self.text = TextAssembler()
        self.admitted = False
        self.chap: ChapTarget | None = None
        self.auth_method: str | None = None
        self.tsih = 0                   # ours, sent only in the final response

    @property
    def who(self) -> str:
        name = self.neg.params().initiator_name if self.admitted else ""
        return f"{name or '?'} at {self.peer}"

    # --- main loop ----------------------------------------------------------------

    async def run(self, first_pdu_timeout: float) -> LoginResult:
        req = await self._read(first_pdu_timeout)
        self._check_first(req)
        while True:
            pairs = self._assemble(req)
            if pairs is None:                     # C=1: ask for the rest of the text
                await self._send(b"")
                req = await self._next()
                continue
            answer, transit, nsg = self._step(req, pairs)
            req, done = await self._answer(req, answer, transit, nsg)
            if done:
                return self._result()

    def _step(self, req: P.LoginRequest, pairs: Pairs) -> tuple[Pairs, bool, Stage]:
        """One complete request text -> (answer, may we transit, to which stage)."""
        log.debug("login from %s: stage %d, T=%d NSG=%d, keys %s", self.who, self.stage,
                  req.transit, req.nsg, [k for k, _ in pairs])      # names only: no secrets
        answer, security = self.neg.process(pairs, self.stage)
        if not self.admitted:
            self._admit()
        if self.stage == Stage.SECURITY:
            answer += self._security(security)
            # Always operational next, never straight to full feature: see module doc.
            return answer, req.transit and self._authenticated(), Stage.OPERATIONAL
        answer += self.neg.offers()
        return answer, req.transit and not self.neg.awaiting_answers, Stage.FULL_FEATURE

    def _result(self) -> LoginResult:
        first = self.first
        assert first is not None
        return LoginResult(params=self.neg.params(), isid=first.isid, tsih=self.tsih,
                           cid=first.cid, statsn=self.statsn, expcmdsn=first.cmdsn)

    # --- admission: names known, before any security exchange -------------------------

    def _admit(self) -> None:
        """Target lookup, redirect and CHAP requirement, once the first text is complete.

        Once only: the negotiator refuses a later SessionType that changes the session
        type (0x0200), so the session that runs is the one admitted here. Re-admitting
        instead could not work: a discovery CHAP check needs a security stage that the
        login may already have left (stages only move forward).

        Redirect comes before security negotiation so that a redirector needs no
        CHAP secrets at all (RFC 7143 §11.13.5 lets a target redirect before
        authenticating and asks initiators to accept that). open-iscsi logs a
        harmless "Login authentication failed" line on such a redirect
        (open-iscsi issue #117) and then logs in at the new address.
        """
        self.admitted = True
        p = self.neg.params()
        target = None if p.discovery else p.target_name
        if target is not None and not self.policy.target_exists(target):
            raise LoginError(f"no target {target}", LoginStatus.NOT_FOUND)
        address = self.policy.redirect(p.initiator_name, target)
        if address:
            raise _Redirect(address)
        secrets = self.policy.chap_for(target, p.initiator_name)
        if secrets is not None:
            try:
                self.chap = _chap_target(secrets)
            except ValueError as e:     # e.g. one secret for both directions: our config's fault
                raise LoginError(f"unusable CHAP configuration: {e}", LoginStatus.TARGET_ERROR)
            if self.stage != Stage.SECURITY:
                raise AuthenticationError("CHAP required but the login skips the security stage")

    # --- security stage ---------------------------------------------------------------

    def _security(self, keys: Pairs) -> Pairs:
        """Answer AuthMethod and the CHAP exchange; other methods' keys are not understood."""
        out: Pairs = []
        chap: dict[str, str] = {}
        for key, value in keys:
            if key == "AuthMethod":
                out.append((key, self._auth_method(value)))
            elif key.startswith("CHAP_"):
                chap[key] = value
            else:
                out.append((key, "NotUnderstood"))
        if chap:
            out += self._chap(chap)
        return out

    def _auth_method(self, offer: str) -> str:
        """CHAP when credentials are configured (or fail), else None, else Reject (module doc)."""
        choice = select_auth_method(offer, ("CHAP",) if self.chap else ("None",))
        if self.chap is not None and choice != "CHAP":
            raise AuthenticationError("CHAP is required but the initiator does not offer it")
        self.auth_method = choice
        return choice

    def _chap(self, keys: dict[str, str]) -> Pairs:
        if self.chap is None or self.auth_method != "CHAP":
            raise AuthenticationError("CHAP keys without AuthMethod=CHAP")
        if "CHAP_A" in keys:
            if len(keys) > 1:
                raise AuthenticationError("CHAP_A must come alone")
            return self.chap.challenge(keys["CHAP_A"])
        return self.chap.verify(keys)

    def _authenticated(self) -> bool:
        """May we leave the security stage? False while a CHAP exchange is under way."""
        if self.chap is None or self.chap.authenticated:
            return True
        if self.auth_method == "CHAP":
            return False
        raise AuthenticationError("CHAP required; the initiator tries to skip it")

    # --- responses ----------------------------------------------------------------------

    async def _answer(self, req: P.LoginRequest, answer: Pairs, transit: bool,
                      nsg: Stage) -> tuple[P.LoginRequest, bool]:
        """Send ``answer``, in C-bit pieces if needed (each acknowledged by an empty
        request). Returns the request to process next, and whether login is done."""
        pieces = split_text(encode_text(answer), LOGIN_SEGMENT)
        for piece in pieces[:-1]:
            await self._send(piece, cont=True)
            req = await self._next()
            if req.cont or req.data:
                raise LoginError("Login Request with text while our response is continued")
        # Only transit if *this* request asked to (§11.13.6); else it will ask again.
        if not (transit and req.transit):
            await self._send(pieces[-1])
            return await self._next(), False
        if nsg == Stage.FULL_FEATURE:
            self.tsih = self._new_tsih()
        await self._send(pieces[-1], transit=True, nsg=nsg)
        self.stage = nsg
        if nsg == Stage.FULL_FEATURE:
            return req, True
        return await self._next(), False

    def _new_tsih(self) -> int:
        tsih = self.policy.new_tsih()
        if not 0 < tsih <= 0xFFFF:
            raise RuntimeError(f"policy returned TSIH {tsih}, not a nonzero 16-bit value")
        return tsih

    def _response(self, status: int, data: bytes, *, transit: bool = False, cont: bool = False,
                  nsg: Stage | int = 0, tsih: int | None = None) -> P.LoginResponse:
        first = self.first
        cmdsn = first.cmdsn if first else 0
        status = LoginStatus(status)
        resp = P.LoginResponse(
            transit=transit, cont=cont, csg=self.stage if status == 0 else 0,
            nsg=nsg if transit else 0, version_max=ISCSI_VERSION, version_active=ISCSI_VERSION,
            isid=first.isid if first else bytes(6), itt=first.itt if first else 0,
            tsih=tsih if tsih is not None else (first.tsih if first else 0), statsn=self.statsn,
            expcmdsn=cmdsn, maxcmdsn=(cmdsn + self.window - 1) & SERIAL_MASK,
            status_class=status.status_class, status_detail=status.status_detail, data=data)
        self.statsn = (self.statsn + 1) & SERIAL_MASK
        return resp

    async def _send(self, data: bytes, *, transit: bool = False, cont: bool = False,
                    nsg: Stage = Stage.SECURITY) -> None:
        """A success-class response; only the final one carries our TSIH."""
        final = transit and nsg == Stage.FULL_FEATURE
        resp = self._response(LoginStatus.SUCCESS, data, transit=transit, cont=cont, nsg=nsg,
                              tsih=self.tsih if final else None)
        await self._write(resp)

    async def fail(self, status: int, pairs: Iterable[tuple[str, str]] = ()) -> None:
        """Failure or redirect response; T, C, CSG and NSG are reserved (zero) in it."""
        try:
            await self._write(self._response(status, encode_text(pairs)))
        except Exception as e:  # noqa: BLE001 - we are closing anyway
            log.info("login from %s: could not send status %#06x: %r", self.who, status, e)

    async def _write(self, resp: P.LoginResponse) -> None:
        """Queue and flush one response. Bounded by the per-PDU timeout, not the
        login deadline, so the last response still goes out near the deadline."""
        self.w.writelines(resp.encode())
        await asyncio.wait_for(self.w.drain(), self.pdu_timeout)

    # --- requests -----------------------------------------------------------------------

    def _remaining(self, timeout: float) -> float:
        return max(0.0, min(timeout, self.deadline - time.monotonic()))

    async def _read(self, timeout: float) -> P.LoginRequest:
        """Next PDU, which must be a Login Request; counts PDUs against the bound."""
        self.pdus += 1
        if self.pdus > self.max_pdus:
            raise LoginError(f"more than {self.max_pdus} Login Requests")
        try:
            pdu = await asyncio.wait_for(P.read_pdu(self.r), self._remaining(timeout))
        except asyncio.TimeoutError:
            raise _Close("timed out waiting for a Login Request") from None
        except ProtocolError as e:
            raise _Close(f"not an iSCSI PDU: {e}") from None
        if pdu is None:
            if self.pdus == 1:
                raise _Probed("connection closed before a first PDU")
            raise _Close("connection closed by the initiator")
        if not isinstance(pdu, P.LoginRequest):
            if self.first is None:
                self.first = P.LoginRequest(itt=pdu.itt)     # so the answer echoes its ITT
            raise LoginError(f"{type(pdu).__name__} during login", LoginStatus.INVALID_DURING_LOGIN)
        return pdu

    async def _next(self) -> P.LoginRequest:
        req = await self._read(self.pdu_timeout)
        self._check_same(req)
        return req

    def _check_first(self, req: P.LoginRequest) -> None:
        self.first = req
        self.statsn = req.expstatsn      # see module doc
        if req.version_min > ISCSI_VERSION:
            raise LoginError(f"versions {req.version_min}..{req.version_max}",
                             LoginStatus.UNSUPPORTED_VERSION)
        if req.tsih:
            raise LoginError("TSIH is nonzero: no session takes another connection",
                             LoginStatus.SESSION_DOES_NOT_EXIST)
        if req.csg not in (Stage.SECURITY, Stage.OPERATIONAL):
            raise LoginError(f"login starts in stage {req.csg}")
        self.stage = Stage(req.csg)
        _check_flags(req)

    def _check_same(self, req: P.LoginRequest) -> None:
        """RFC 7143 §11.12: every request of a login carries the first one's fields."""
        f = self.first
        assert f is not None
        if (req.itt, req.isid, req.tsih, req.cid, req.version_max, req.version_min) != (
                f.itt, f.isid, f.tsih, f.cid, f.version_max, f.version_min):
            raise LoginError("Login Request changed ITT, ISID, TSIH, CID or version")
        if req.csg != self.stage:
            raise LoginError(f"Login Request in stage {req.csg}, expected {int(self.stage)}")
        _check_flags(req)

    def _assemble(self, req: P.LoginRequest) -> Pairs | None:
        try:
            return self.text.feed(req.data, req.cont)
        except TextError as e:
            raise LoginError(f"bad login text: {e}") from None


def _status_name(status: int) -> str:
    try:
        return LoginStatus(status).name
    except ValueError:
        return f"{status:#06x}"


def _check_flags(req: P.LoginRequest) -> None:
    """C and T exclude each other; a transit must go forward to stage 1 or 3."""
    if req.cont and req.transit:
        raise LoginError("Login Request with both C and T bits")
    if req.transit and (req.nsg not in (Stage.OPERATIONAL, Stage.FULL_FEATURE)
                        or req.nsg <= req.csg):
        raise LoginError(f"transit from stage {req.csg} to {req.nsg}")


def _chap_target(s: ChapSecrets) -> ChapTarget:
    """ChapTarget from the policy's secrets; a mutual pair only when both halves are set."""
    mutual_user = getattr(s, "mutual_user", None)
    mutual_secret = getattr(s, "mutual_secret", None)
    mutual = ChapCredentials(mutual_user, mutual_secret) if mutual_user and mutual_secret else None
    return ChapTarget(ChapCredentials(s.user, s.secret), mutual)


async def _close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close after our last response got out: half-close, drain what the peer still
    sends for a moment (closing with unread input would reset the connection and
    could destroy the response before the initiator reads it), then close."""
    try:
        if writer.can_write_eof():
            writer.write_eof()
        end = time.monotonic() + CLOSE_LINGER
        while (left := end - time.monotonic()) > 0:
            if not await asyncio.wait_for(reader.read(65536), left):
                break
    except (ConnectionError, asyncio.TimeoutError, OSError, RuntimeError):
        pass
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), CLOSE_LINGER)
        except (ConnectionError, asyncio.TimeoutError, OSError):
            pass
