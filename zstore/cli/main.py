"""``zstore``: the admin CLI. Every command is one or a few meta API calls.

Exit codes (scripts rely on them): 0 ok, 2 bad usage or invalid argument,
3 not found, 4 conflict or insufficient resources, 5 meta/etcd unavailable,
6 unauthenticated, 1 anything else. Errors go to stderr as
``zstore: error: MESSAGE`` and ``  hint: WHAT TO DO``; the token and CHAP
secrets are scrubbed from anything printed.

Global options work before or after the subcommand. ``zstore up``/``down``
live in ``zstore/up.py`` and are imported only when asked for, so the other
commands start fast.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO

from zstore import __version__, errors
from zstore.cli import output
from zstore.cli.client import MetaClient, Response, seg
from zstore.config import ConfigError, find_config_file, load, read_secret_file
from zstore.logs import redact, scrub
from zstore.units import SizeError, parse_size

CHAP_SECRET_MIN, CHAP_SECRET_MAX = 12, 255      # bytes of UTF-8, as the meta server counts them
LIO_NULL = "NULL"        # a CHAP value starting so is "no value" to LIO (meta/exports.py)
_GLOBALS = ("config", "state_dir", "endpoint", "json")
WHOLE_TARGET_HELP = ("CHAP is per target: with a volume name, required when its target also "
                     "serves other volumes, which then change too")


# -- plumbing shared by the handlers ----------------------------------------------

class Ctx:
    """What a handler needs: the parsed args, a lazily built client, and stdout."""

    def __init__(self, args: argparse.Namespace, out: TextIO | None = None):
        self.args = args
        self.out = out if out is not None else sys.stdout
        self._client: MetaClient | None = None

    @property
    def client(self) -> MetaClient:
        if self._client is None:
            self._client = make_client(self.args)
        return self._client

    def show(self, data: Any, render: Callable[[Any], str]) -> int:
        """Print ``data`` as JSON with --json, else as ``render(data)``."""
        print(output.to_json(data) if self.args.json else render(data), file=self.out)
        return 0

    def done(self, data: Any, message: str) -> int:
        """Report a change: the API's answer with --json, else one sentence (with the
        client's note when a retried DELETE found its object already gone)."""
        if isinstance(data, dict) and data.get("already_gone"):
            message += f" ({data.get('note')})"
        return self.show(data, lambda _: message)


def make_client(args: argparse.Namespace) -> MetaClient:
    explicit = args.config or (str(Path(args.state_dir) / "zstore.toml") if args.state_dir else None)
    path = find_config_file(explicit)
    try:
        cfg = load(path, overrides={"client.endpoints": args.endpoint or None})
    except ConfigError as e:
        if args.state_dir and not args.config and not Path(explicit or "").exists():
            raise errors.InvalidArgument(
                f"no cluster config in {args.state_dir} ({explicit} does not exist)",
                f"start a local cluster there with `zstore up --state-dir {args.state_dir}`") from None
        raise errors.InvalidArgument(str(e)) from None
    if args.endpoint:
        source = "--endpoint"
    elif cfg.source:
        source = cfg.source
    else:
        source = "the built-in default; no config file found"
    try:
        return MetaClient.from_config(cfg.client, config_source=source)
    except ConfigError as e:
        raise errors.InvalidArgument(str(e)) from None


def size_arg(text: str, what: str = "size") -> int:
    """Validate a size before any network call, so a typo never reaches the cluster."""
    try:
        n = parse_size(text)
    except SizeError as e:
        raise errors.InvalidArgument(str(e), "sizes look like 10Gi, 500Mi, 1T or 4096 (bytes)") from None
    if n <= 0:
        raise errors.InvalidArgument(f"invalid {what} {text!r}: must be greater than zero")
    return n


def snapshot_ref(first: str, second: str | None) -> tuple[str, str]:
    """``VOLUME SNAP`` or ``VOLUME@SNAP`` -> (volume, snap)."""
    if second is None:
        vol, at, snap = first.partition("@")
        if not at or not vol or not snap or "@" in snap:
            raise errors.InvalidArgument(
                f"expected VOLUME SNAPSHOT or VOLUME@SNAPSHOT, got {first!r}")
        return vol, snap
    if "@" in first:
        raise errors.InvalidArgument(
            f"give either VOLUME@SNAPSHOT or VOLUME SNAPSHOT, not both ({first!r} {second!r})")
    return first, second


# -- CHAP secrets: never on the command line -----------------------------------

def read_chap_secrets(secret_file: str | None, mutual_user: str | None,
                      mutual_secret_file: str | None, stdin: TextIO | None = None,
                      prompt: Callable[[str], str] = getpass.getpass) -> tuple[str, str | None]:
    """Secrets from files, else stdin lines (secret, then mutual secret), else a prompt."""
    stdin = sys.stdin if stdin is None else stdin
    if mutual_user is not None and not mutual_user.strip():
        raise errors.InvalidArgument("--mutual-user must not be empty",
                                     "leave it out to set one-way CHAP")
    if mutual_secret_file and not mutual_user:
        raise errors.InvalidArgument("--mutual-secret-file needs --mutual-user")
    secret = read_secret_file(secret_file, "CHAP secret") if secret_file else None
    mutual = read_secret_file(mutual_secret_file, "mutual CHAP secret") if mutual_secret_file else None
    wanted = (["CHAP secret"] if secret is None else []) + \
             (["mutual CHAP secret"] if mutual_user and mutual is None else [])
    if wanted:
        read = _secrets_by_prompt if _isatty(stdin) else _secrets_from_stdin
        got = dict(zip(wanted, read(stdin, prompt, wanted)))
        secret = got.get("CHAP secret", secret)
        mutual = got.get("mutual CHAP secret", mutual)
    assert secret is not None
    for what, value in (("CHAP secret", secret), ("mutual CHAP secret", mutual)):
        if value is not None:
            redact(value)
            try:
                n = len(value.encode("utf-8"))
            except UnicodeEncodeError:      # undecodable bytes on stdin; never echo them
                raise errors.InvalidArgument(f"{what} is not UTF-8 text") from None
            if not CHAP_SECRET_MIN <= n <= CHAP_SECRET_MAX:
                raise errors.InvalidArgument(
                    f"{what} must be {CHAP_SECRET_MIN}-{CHAP_SECRET_MAX} bytes long in UTF-8, i.e. "
                    f"{CHAP_SECRET_MIN}-{CHAP_SECRET_MAX} characters if ASCII (got {n} bytes)",
                    "RFC 7143 asks for at least 96 bits of secret")
            if value.startswith(LIO_NULL):
                raise errors.InvalidArgument(f"{what} must not start with {LIO_NULL!r}: "
                                             "the iSCSI target reads that as no secret")
    if mutual is not None and mutual == secret:
        raise errors.InvalidArgument("the mutual CHAP secret must differ from the CHAP secret")
    return secret, mutual


def _isatty(f: TextIO) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):
        return False


def _secrets_from_stdin(stdin: TextIO, prompt: Callable[[str], str], wanted: list[str]) -> list[str]:
    """One secret per line, in the order of ``wanted``."""
    lines = [line.strip() for line in stdin.read().splitlines()]
    for i, what in enumerate(wanted):
        if i >= len(lines) or not lines[i]:
            raise errors.InvalidArgument(
                f"no {what} on stdin (expected {len(wanted)} line(s): {', '.join(wanted)})",
                "pipe the secret in, or use --secret-file FILE / --mutual-secret-file FILE")
    return lines[:len(wanted)]


def _secrets_by_prompt(stdin: TextIO, prompt: Callable[[str], str], wanted: list[str]) -> list[str]:
    """Typed twice without echo, so a typo does not lock an initiator out."""
    got = []
    for what in wanted:
        first = prompt(f"{what}: ").strip()
        if prompt(f"{what} (again): ").strip() != first:
            raise errors.InvalidArgument(f"the two {what}s typed differ")
        if not first:
            raise errors.InvalidArgument(f"no {what} given")
        got.append(first)
    return got


# -- handlers -------------------------------------------------------------------

def cmd_cluster_status(ctx: Ctx) -> int:
    return ctx.show(ctx.client.get("/cluster"), output.cluster_status)


def cmd_chunk_list(ctx: Ctx) -> int:
    return ctx.show(ctx.client.get("/chunks")["chunks"], output.chunk_table)


def cmd_chunk_show(ctx: Ctx) -> int:
    return ctx.show(ctx.client.get(f"/chunks/{seg(ctx.args.id)}"), output.chunk_detail)


def _chunk_id(answer: Any, key: str, typed: str) -> str:
    """The full id the meta acted on (the command may have named a prefix of it)."""
    got = answer.get(key) if isinstance(answer, dict) else None
    return got if isinstance(got, str) and got else typed


def cmd_chunk_drain(ctx: Ctx) -> int:
    c = ctx.client.post(f"/chunks/{seg(ctx.args.id)}/drain")
    return ctx.done(c, f"chunk server {_chunk_id(c, 'chunk_id', ctx.args.id)} is draining: no new replicas "
                       "will be placed on it, and its iSCSI initiators are asked to log in elsewhere")


def cmd_chunk_undrain(ctx: Ctx) -> int:
    c = ctx.client.post(f"/chunks/{seg(ctx.args.id)}/undrain")
    return ctx.done(c, f"chunk server {_chunk_id(c, 'chunk_id', ctx.args.id)} is active again")


def cmd_chunk_remove(ctx: Ctx) -> int:
    r = ctx.client.delete(f"/chunks/{seg(ctx.args.id)}", force=ctx.args.force)
    return ctx.done(r, f"removed chunk server {_chunk_id(r, 'removed', ctx.args.id)}")


def _volume_summary(v: dict[str, Any]) -> str:
    return (f"{output.size(v.get('size'))}, {v.get('replicas')} replica(s), "
            f"{'thin' if v.get('thin', True) else 'thick'}; target {v.get('target_iqn')} LUN {v.get('lun')}")


def cmd_volume_create(ctx: Ctx) -> int:
    a = ctx.args
    body: dict[str, Any] = {"name": a.name, "size": size_arg(a.size), "thin": not a.thick}
    if a.replicas is not None:
        body["replicas"] = a.replicas
    return _create_volume(ctx, body)


def _create_volume(ctx: Ctx, body: dict[str, Any]) -> int:
    r: Response = ctx.client.request("POST", "/volumes", body)
    v = r.data
    verb = "created:" if r.status == 201 else "already exists, unchanged:"
    return ctx.done(v, f"volume {v.get('name')} {verb} {_volume_summary(v)}")


def cmd_volume_list(ctx: Ctx) -> int:
    a = ctx.args
    if a.limit is not None:
        if a.limit <= 0:
            raise errors.InvalidArgument(f"--limit must be a positive number, not {a.limit}")
        page = ctx.client.get("/volumes", limit=a.limit, start_after=a.start_after)
        if ctx.args.json:
            return ctx.show(page, output.to_json)      # the caller pages: keep "next"
        text = output.volume_table(page["volumes"])
        if page.get("next"):
            text += f"\n(more: zstore volume list --limit {a.limit} --start-after {page['next']})"
        print(text, file=ctx.out)
        return 0
    volumes: list[dict[str, Any]] = []
    cursor = a.start_after
    while True:
        page = ctx.client.get("/volumes", start_after=cursor)
        volumes += page["volumes"]
        nxt = page.get("next")
        if not nxt or nxt == cursor:
            break
        cursor = nxt
    return ctx.show(volumes, output.volume_table)


def cmd_volume_show(ctx: Ctx) -> int:
    return ctx.show(ctx.client.get(f"/volumes/{seg(ctx.args.name)}"), output.volume_detail)


def cmd_volume_resize(ctx: Ctx) -> int:
    v = ctx.client.post(f"/volumes/{seg(ctx.args.name)}/resize", {"size": size_arg(ctx.args.size)})
    return ctx.done(v, f"volume {ctx.args.name} is {output.size(v.get('size'))} ({v.get('size')} bytes)")


def cmd_volume_delete(ctx: Ctx) -> int:
    r = ctx.client.delete(f"/volumes/{seg(ctx.args.name)}", force=ctx.args.force)
    # The name and id the meta deleted, not the words typed: an id names another volume.
    r = r if isinstance(r, dict) else {}
    name, vid = r.get("name"), r.get("deleted")
    if name and vid:
        return ctx.done(r, f"deleted volume {name} (id {vid})")
    return ctx.done(r, f"deleted volume {ctx.args.name}" + (f" (id {vid})" if vid else ""))


def cmd_volume_revert(ctx: Ctx) -> int:
    """Online revert: a chunk server rewrites what changed since the snapshot (up to a minute)."""
    a = ctx.args
    vol, snap = snapshot_ref(a.volume, a.snapshot)
    client = ctx.client
    client.timeout = max(client.timeout, 75.0)     # the meta waits up to 60 s for the chunk server
    # A revert is not idempotent: one id per invocation, sent again by the client's own
    # retries (a lost answer, a failover), so a retry gets the first revert's outcome
    # instead of reverting again. Running the command again is a new request.
    request_id = uuid.uuid4().hex
    r = client.post(f"/volumes/{seg(vol)}/revert", {"snapshot": snap, "request_id": request_id})
    return ctx.done(r, f"volume {vol} reverted to snapshot {snap}")


def cmd_volume_clone(ctx: Ctx) -> int:
    """A clone is a volume created from a snapshot; its size defaults to the snapshot's."""
    a = ctx.args
    vol, snap = snapshot_ref(a.source, None)
    size = size_arg(a.size) if a.size else None
    if size is None:
        match = next((s for page in _snapshot_pages(ctx, vol) for s in page if s.get("name") == snap), None)
        if match is None:
            raise errors.NotFound(f"volume {vol} has no snapshot {snap}",
                                  f"list them with `zstore snapshot list {vol}`")
        size = int(match["size"])
    body: dict[str, Any] = {"name": a.name, "size": size, "thin": not a.thick,
                            "source_snapshot": f"{vol}@{snap}"}
    if a.replicas is not None:
        body["replicas"] = a.replicas
    return _create_volume(ctx, body)


def cmd_snapshot_create(ctx: Ctx) -> int:
    vol, snap = snapshot_ref(ctx.args.volume, ctx.args.snapshot)
    ctx.client.timeout = max(ctx.client.timeout, 20.0)   # the meta waits up to 10 s for the volume's writer
    r = ctx.client.request("POST", f"/volumes/{seg(vol)}/snapshots", {"name": snap})
    verb = "created" if r.status == 201 else "already exists"
    return ctx.done(r.data, f"snapshot {vol}@{snap} {verb} ({output.size((r.data or {}).get('size'))})")


def _snapshot_pages(ctx: Ctx, volume: str | None) -> Iterator[list[dict[str, Any]]]:
    """The meta's pages of snapshots (all, or one volume's), following ``next`` to the end."""
    token = None
    while True:
        page = ctx.client.get("/snapshots", volume=volume, start_after=token)
        yield page["snapshots"]
        token = page.get("next")
        if not token:
            return


def cmd_snapshot_list(ctx: Ctx) -> int:
    snaps = [s for page in _snapshot_pages(ctx, ctx.args.volume) for s in page]
    # Pages come in key order; shown by volume, then age, as one answer used to be.
    snaps.sort(key=lambda s: (s.get("volume_id") or "", s.get("created") or 0, s.get("name") or ""))
    return ctx.show(snaps, output.snapshot_table)


def cmd_snapshot_delete(ctx: Ctx) -> int:
    a = ctx.args
    if a.snapshot is None and a.volume and "@" not in a.volume and _is_id(a.volume):
        # A snapshot id alone: also reaches snapshots whose volume was deleted.
        r = ctx.client.delete(f"/snapshots/{seg(a.volume)}", force=a.force)
        return ctx.done(r, f"deleted snapshot {a.volume}")
    vol, snap = snapshot_ref(ctx.args.volume, ctx.args.snapshot)
    r = ctx.client.delete(f"/volumes/{seg(vol)}/snapshots/{seg(snap)}", force=a.force)
    return ctx.done(r, f"deleted snapshot {vol}@{snap}")


def _snapshot_id_or_ref(a: argparse.Namespace) -> str:
    """The path segment naming a snapshot: its id, or VOLUME@SNAP."""
    if a.snapshot is None and "@" not in a.volume and _is_id(a.volume):
        return a.volume
    vol, snap = snapshot_ref(a.volume, a.snapshot)
    return f"{vol}@{snap}"


def cmd_snapshot_export(ctx: Ctx) -> int:
    ref = _snapshot_id_or_ref(ctx.args)
    r: Response = ctx.client.request("POST", f"/snapshots/{seg(ref)}/export")
    e = r.data or {}
    verb = "exported read-only as" if r.status == 201 else "is already exported as"
    msg = (f"snapshot {ref} {verb} LUN {e.get('lun')} of target {e.get('target_iqn')} (WWN {e.get('wwn')})"
           + ("" if e.get("acl") else f"; no initiator sees it yet: `zstore acl add {ref} IQN`"))
    return ctx.done(e, msg)


def cmd_snapshot_unexport(ctx: Ctx) -> int:
    ref = _snapshot_id_or_ref(ctx.args)
    r = ctx.client.delete_strict(f"/snapshots/{seg(ref)}/export")
    return ctx.done(r, f"snapshot {ref} unexported" if r.get("removed") else f"snapshot {ref} was not exported")


def _is_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


def cmd_target_list(ctx: Ctx) -> int:
    return ctx.show(ctx.client.get("/targets")["targets"], output.target_table)


def cmd_acl_add(ctx: Ctx) -> int:
    a = ctx.args
    e = ctx.client.put(f"/volumes/{seg(a.volume)}/acl/{seg(a.initiator)}", {"readonly": a.readonly})
    if "@" in a.volume:
        return ctx.done(e, f"initiator {a.initiator} may read snapshot {a.volume} (read-only)")
    mode = "read-only" if a.readonly else "read-write"
    return ctx.done(e, f"initiator {a.initiator} may access volume {a.volume} ({mode})")


def cmd_acl_remove(ctx: Ctx) -> int:
    a = ctx.args
    r = ctx.client.delete(f"/volumes/{seg(a.volume)}/acl/{seg(a.initiator)}")
    what = "snapshot" if "@" in a.volume else "volume"
    return ctx.done(r, f"initiator {a.initiator} may no longer access {what} {a.volume}")


def cmd_acl_list(ctx: Ctx) -> int:
    return ctx.show(ctx.client.get(f"/volumes/{seg(ctx.args.volume)}/acl")["initiators"],
                    output.acl_table)


def check_chap_user(value: str | None, option: str) -> None:
    """What LIO can store as a CHAP user name (the meta checks the rest)."""
    if value is None or not value.strip():
        return                 # empty: refused by read_chap_secrets / the meta, in their words
    if value.startswith(LIO_NULL):
        raise errors.InvalidArgument(f"invalid {option} {value!r:.80}: must not start with {LIO_NULL!r} "
                                     "(the iSCSI target reads that as no user)")
    if value != value.strip():
        raise errors.InvalidArgument(f"invalid {option} {value!r:.80}: must not start or end with "
                                     "whitespace (the iSCSI target strips it)")


def chap_target(ctx: Ctx, target: str, whole_target: bool) -> tuple[str, str]:
    """(the target to send, how to name it) for a CHAP command's TARGET.

    CHAP is per target, and a target serves up to 255 volumes: given a volume name (or
    VOLUME@SNAP) the CLI resolves its target IQN itself, names it and the other volumes
    it serves, and refuses unless --whole-target when there are others. It then sends the
    IQN, so the meta changes exactly the target shown."""
    if target == "*" or target[:4].lower() in ("iqn.", "eui.", "naa."):
        return target, ("every target" if target == "*" else f"target {target}")
    if "@" in target:
        snap = ctx.client.get(f"/snapshots/{seg(target)}")
        iqn = (snap.get("export") or {}).get("target_iqn")
        label = f"{snap.get('volume')}@{snap.get('name')}"
        if not iqn:
            raise errors.Conflict(f"snapshot {label} is not exported, so it has no target",
                                  f"export it first with `zstore snapshot export {label}`")
    else:
        vol = ctx.client.get(f"/volumes/{seg(target)}")
        iqn, label = vol.get("target_iqn"), vol.get("name") or target
    served = next((t.get("volumes") or [] for t in ctx.client.get("/targets")["targets"]
                   if t.get("iqn") == iqn), [])
    others = [v["volume"] for v in served if v.get("volume") and v["volume"] != label]
    listed = ", ".join(others[:10]) + (f" and {len(others) - 10} more" if len(others) > 10 else "")
    if others and not whole_target:
        raise errors.InvalidArgument(
            f"CHAP is per target, and {label}'s target {iqn} also serves {listed}: "
            "pass --whole-target to change CHAP for all of them",
            f"or give the target itself: `zstore chap ... {iqn} INITIATOR`")
    return iqn, f"target {iqn} (the target of {label}" + (f"; also serving {listed})" if others else ")")


def cmd_chap_set(ctx: Ctx) -> int:
    a = ctx.args
    check_chap_user(a.user, "--user")
    check_chap_user(a.mutual_user, "--mutual-user")
    target, where = chap_target(ctx, a.target, a.whole_target)
    secret, mutual = read_chap_secrets(a.secret_file, a.mutual_user, a.mutual_secret_file)
    body: dict[str, Any] = {"target": target, "initiator": a.initiator, "user": a.user,
                            "secret": secret}
    if a.mutual_user:
        body.update(mutual_user=a.mutual_user, mutual_secret=mutual)
    e = ctx.client.put("/chap", body)
    mutual_note = f", mutual user {a.mutual_user}" if a.mutual_user else ""
    return ctx.done(e, f"CHAP set for initiator {a.initiator} on {where} "
                       f"(user {a.user}{mutual_note})")


def cmd_chap_clear(ctx: Ctx) -> int:
    a = ctx.args
    target, where = chap_target(ctx, a.target, a.whole_target)
    r = ctx.client.delete("/chap", {"target": target, "initiator": a.initiator})
    return ctx.done(r, f"CHAP cleared for initiator {a.initiator} on {where}")


def cmd_chap_list(ctx: Ctx) -> int:
    return ctx.show(ctx.client.get("/chap")["chap"], output.chap_table)


# -- zstore up / down (zstore/up.py, another module) ---------------------------------

def _up_module(required: bool) -> Any:
    try:
        from zstore import up
    except ImportError:
        import importlib.util
        if importlib.util.find_spec("zstore.up") is not None:
            raise                 # it exists but is broken: show why
        if required:
            raise errors.ZError("`zstore up`/`zstore down` are not available: zstore/up.py is "
                                "missing from this installation",
                                "reinstall zstore, or start etcd, meta and chunk servers by hand") from None
        return None
    return up


def cmd_up(ctx: Ctx) -> int:
    return int(_up_module(required=True).run_up(ctx.args))


def cmd_down(ctx: Ctx) -> int:
    return int(_up_module(required=True).run_down(ctx.args))


# -- the parser -------------------------------------------------------------------

def _add_globals(p: argparse.ArgumentParser, prefix: str, suppress: bool) -> None:
    """Global options; on subcommands they default to SUPPRESS so they never undo ones given earlier."""
    d: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    opts: list[tuple[tuple[str, ...], dict[str, Any]]] = [
        (("--config",), dict(metavar="FILE", dest=prefix + "config",
                             help="config file (default: $ZSTORE_CONFIG, the local cluster's, "
                                  "/etc/zstore/zstore.toml)")),
        (("--state-dir",), dict(metavar="DIR", dest=prefix + "state_dir",
                                help="use the local cluster in DIR (its DIR/zstore.toml)")),
        (("--endpoint",), dict(metavar="URL", dest=prefix + "endpoint", action="append",
                               help="meta server URL; repeatable; overrides client.endpoints")),
        (("--json",), dict(dest=prefix + "json", action="store_true",
                           help="print the API's JSON instead of a table")),
    ]
    for flags, kw in opts:
        try:
            p.add_argument(*flags, **{**kw, **d})
        except argparse.ArgumentError:
            pass          # the subcommand (zstore up) defines it itself


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zstore", description="Administer a zstore block storage cluster.",
        epilog="exit codes: 0 ok, 2 bad usage, 3 not found, 4 conflict or insufficient "
               "resources, 5 unavailable, 6 unauthenticated, 1 other")
    parser.add_argument("--version", action="version", version=f"zstore {__version__}")
    _add_globals(parser, "g_", suppress=False)
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def group(name: str, help: str) -> argparse._SubParsersAction:
        p = top.add_parser(name, help=help, description=help)
        return p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def leaf(sub: argparse._SubParsersAction, name: str, func: Callable[[Ctx], int],
             help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        _add_globals(p, "s_", suppress=True)
        return p

    g = group("cluster", "cluster-wide status")
    leaf(g, "status", cmd_cluster_status, "leader, meta servers, etcd, chunk servers, capacity")

    g = group("chunk", "chunk servers")
    leaf(g, "list", cmd_chunk_list, "list chunk servers with status, state and capacity")
    leaf(g, "show", cmd_chunk_show, "one chunk server with its disks' capacity and use").add_argument(
        "id", metavar="ID")
    for name, func, help in (("drain", cmd_chunk_drain, "place no new replicas on a chunk server and move its "
                                                         "iSCSI initiators elsewhere"),
                             ("undrain", cmd_chunk_undrain, "make a draining chunk server active again")):
        leaf(g, name, func, help).add_argument("id", metavar="ID")
    p = leaf(g, "remove", cmd_chunk_remove, "forget a chunk server (it must be down and empty)")
    p.add_argument("id", metavar="ID")
    p.add_argument("--force", action="store_true", help="remove even while up or holding replicas")

    g = group("volume", "volumes")
    p = leaf(g, "create", cmd_volume_create, "create a volume (idempotent by name)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--size", required=True, metavar="SIZE", help="e.g. 10Gi, 500Mi, 1T")
    p.add_argument("--replicas", type=int, metavar="N", help="1-3 (default 3)")
    p.add_argument("--thick", action="store_true", help="reserve the full size up front")
    p = leaf(g, "list", cmd_volume_list, "list volumes sorted by name")
    p.add_argument("--limit", type=int, metavar="N", help="at most N volumes (one page)")
    p.add_argument("--start-after", metavar="NAME", help="start after this name")
    leaf(g, "show", cmd_volume_show, "a volume's target, LUN, WWN and replicas").add_argument(
        "name", metavar="NAME")
    p = leaf(g, "resize", cmd_volume_resize, "grow a volume")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--size", required=True, metavar="SIZE", help="the new size, e.g. 20Gi")
    p = leaf(g, "delete", cmd_volume_delete, "delete a volume")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--force", action="store_true", help="delete even while initiators are on its ACL")
    p = leaf(g, "revert", cmd_volume_revert, "revert a volume to one of its snapshots (online)")
    p.add_argument("volume", metavar="VOLUME", help="VOLUME, or VOLUME@SNAP alone")
    p.add_argument("snapshot", metavar="SNAP", nargs="?")
    p = leaf(g, "clone", cmd_volume_clone, "create a volume from a snapshot")
    p.add_argument("source", metavar="VOLUME@SNAP")
    p.add_argument("name", metavar="NEWNAME")
    p.add_argument("--size", metavar="SIZE", help="default: the snapshot's size")
    p.add_argument("--replicas", type=int, metavar="N", help="1-3 (default 3)")
    p.add_argument("--thick", action="store_true", help="reserve the full size up front")

    g = group("snapshot", "snapshots")
    for name, func, help in (("create", cmd_snapshot_create, "snapshot a volume (idempotent)"),
                             ("delete", cmd_snapshot_delete, "delete a snapshot"),
                             ("export", cmd_snapshot_export, "export a snapshot as a read-only LUN "
                                                             "(idempotent; then `zstore acl add VOLUME@SNAP IQN`)"),
                             ("unexport", cmd_snapshot_unexport, "remove a snapshot's LUN and its ACL")):
        p = leaf(g, name, func, help)
        p.add_argument("volume", metavar="VOLUME",
                       help="VOLUME, or VOLUME@SNAP alone (all but create also take a snapshot id)")
        p.add_argument("snapshot", metavar="SNAP", nargs="?")
        if name == "delete":
            p.add_argument("--force", action="store_true", help="delete even while exported (unexports it)")
    leaf(g, "list", cmd_snapshot_list, "list snapshots, of one volume or all").add_argument(
        "volume", metavar="VOLUME", nargs="?")

    g = group("target", "iSCSI targets")
    leaf(g, "list", cmd_target_list, "list targets with their LUNs and volumes")

    g = group("acl", "which initiators may access a volume or an exported snapshot (VOLUME@SNAP)")
    p = leaf(g, "add", cmd_acl_add, "allow an initiator to access a volume")
    p.add_argument("volume", metavar="VOLUME", help="VOLUME, or VOLUME@SNAP (always read-only)")
    p.add_argument("initiator", metavar="INITIATOR_IQN")
    p.add_argument("--readonly", action="store_true", help="read-only access")
    p = leaf(g, "remove", cmd_acl_remove, "revoke an initiator's access")
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("initiator", metavar="INITIATOR_IQN")
    leaf(g, "list", cmd_acl_list, "list a volume's initiators").add_argument("volume", metavar="VOLUME")

    g = group("chap", "CHAP credentials (secrets are read from files, stdin or a prompt)")
    p = leaf(g, "set", cmd_chap_set, "set CHAP credentials for an initiator on a target")
    p.add_argument("target", metavar="TARGET", help="target IQN, volume name (its target), or '*' for all")
    p.add_argument("initiator", metavar="INITIATOR")
    p.add_argument("--whole-target", action="store_true", help=WHOLE_TARGET_HELP)
    p.add_argument("--user", required=True, metavar="U")
    p.add_argument("--mutual-user", metavar="MU", help="enable mutual CHAP with this user")
    p.add_argument("--secret-file", metavar="F", help="file holding the secret (default: stdin line 1)")
    p.add_argument("--mutual-secret-file", metavar="F",
                   help="file holding the mutual secret (default: next stdin line)")
    p = leaf(g, "clear", cmd_chap_clear, "remove CHAP credentials")
    p.add_argument("target", metavar="TARGET", help="target IQN, volume name (its target), or '*'")
    p.add_argument("initiator", metavar="INITIATOR")
    p.add_argument("--whole-target", action="store_true", help=WHOLE_TARGET_HELP)
    leaf(g, "list", cmd_chap_list, "list CHAP entries (never secrets)")

    up_mod = _up_module(required=False) if {"up", "down"} & set(argv) else None
    for name, func, help in (("up", cmd_up, "start a local cluster (etcd, meta, chunk servers)"),
                             ("down", cmd_down, "stop the local cluster")):
        p = top.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        if up_mod is not None:       # up.py brings its own --state-dir
            getattr(up_mod, f"add_{name}_arguments")(p)
        else:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _merge_globals(args: argparse.Namespace) -> None:
    """One value per global option: the subcommand's own, else given after it, else before it."""
    for name in _GLOBALS:
        own = getattr(args, name, None)
        after = getattr(args, "s_" + name, None)
        before = getattr(args, "g_" + name, None)
        if name == "endpoint":
            value = own or ((before or []) + (after or [])) or None
        else:
            value = own if own not in (None, False) else (after if after not in (None, False) else before)
        setattr(args, name, value)


def _error(err_msg: str, hint: str | None = None) -> None:
    print(f"zstore: error: {scrub(err_msg)}", file=sys.stderr)
    if hint:
        print(f"  hint: {scrub(hint)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as e:       # argparse: --help (0) or bad usage (2)
        return e.code if isinstance(e.code, int) else 2
    _merge_globals(args)
    try:
        return args.func(Ctx(args))
    except errors.ZError as e:
        _error(e.message, e.hint)
        return e.exit_code
    except ConfigError as e:
        _error(str(e))
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:       # `zstore volume list | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
