"""``zstore up`` / ``zstore down``: a whole cluster on this machine with one command.

``up`` runs in the foreground as a supervisor: it starts an embedded etcd,
the meta server(s), the iSCSI redirector on the VIP 127.0.0.2 (a loopback
address, so it needs no privileges), N chunk servers and the CSI driver
(controller mode on ``DIR/csi.sock``: the node mode needs root and open-iscsi)
as child processes, waits until each stage answers, prints where everything
is, and stops them all in reverse order (CSI, redirector, chunks, metas, etcd)
on Ctrl-C, SIGTERM or ``zstore down``. Everything lives in one state directory, so a second ``up``
reuses the token, the etcd data and the chunk ids.

Children run in their own sessions, so a Ctrl-C in the terminal reaches only
the supervisor, which then controls the shutdown order. On Linux each child
also asks the kernel for SIGTERM should the supervisor itself die (even by
SIGKILL), so no orphan keeps a port. A child that dies is reported loudly but
not restarted: tests kill chunk servers on purpose.

Layout of the state dir::

    token            cluster token (0600), made once
    zstore.toml      client config the CLI finds by itself
    up.pid           supervisor pid, flock'ed while it runs
    up.json          what runs now (pids, ports), for ``down`` and for tests
    csi.sock         the CSI driver's gRPC socket (Identity + Controller)
    etcd/            etcd data          metaN.toml, chunkN.toml, redirector.toml  daemon configs
    chunkN/          chunk data dir     logs/NAME.log             each child's output
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from zstore.config import default_state_dir

DEFAULT_BASE_PORT = 7480
DEFAULT_CHUNK_CAPACITY = "20Gi"
MAX_METAS = MAX_CHUNKS = 10          # port blocks of 10: metas base+10.., chunks base+20.. and +30..
PREFIX = "/zstore"
VIP = "127.0.0.2"                    # the redirector's address: the one portal initiators need
DEFAULT_VIP_PORT = 3260
STOP_GRACE = 10.0                    # SIGTERM, then SIGKILL after this
READY_TIMEOUT = 30.0
LEADER_TIMEOUT = 20.0
ETCD_MISSING = "etcd not found; install Debian's etcd-server"
UNIX_PATH_MAX = 107                  # sun_path is 108 bytes with the trailing NUL

UP_EPILOG = """\
Runs in the foreground; Ctrl-C (or `zstore down` from another terminal) stops
every process, the redirector and chunk servers first and etcd last. State is
kept in the state dir (default: $ZSTORE_STATE_DIR, else
~/.local/state/zstore), so running it again brings back the same cluster.
Ports used: BASE (etcd client), BASE+1 (etcd peer), BASE+10+i (meta i),
BASE+20+i (chunk i data), BASE+30+i (chunk i iSCSI portal), and
127.0.0.2:VIP_PORT (the redirector, where initiators log in). The CSI driver
(controller) listens on the unix socket DIR/csi.sock.
Exit status: 0 after a clean stop, 1 when the cluster could not be started,
2 for bad arguments.
"""

DOWN_EPILOG = """\
Signals the `zstore up` running from the state dir and waits until it has
stopped every process. Exit status: 0 when the cluster stopped or when nothing
was running (stopping is idempotent; the message says which), 1 when it did
not stop within --timeout.
"""


class UpError(Exception):
    """Why the cluster could not be started (one clear message, exit 1)."""


# -- arguments --------------------------------------------------------------------

def _count(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}")
        return n
    return parse


def _capacity(text: str) -> str:
    from zstore.units import SizeError, parse_size
    try:
        if parse_size(text) <= 0:
            raise argparse.ArgumentTypeError("must be positive")
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _state_dir_argument(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: never overwrite a --state-dir the caller's parser already set.
    parser.add_argument("--state-dir", metavar="DIR", dest="state_dir", default=argparse.SUPPRESS,
                        help="where the cluster's state lives (default: %s)" % default_state_dir())


def add_up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = UP_EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    _state_dir_argument(parser)
    parser.add_argument("--chunks", type=_count(0, MAX_CHUNKS), default=3, metavar="N",
                        help="chunk servers to run (default 3)")
    parser.add_argument("--metas", type=_count(1, MAX_METAS), default=1, metavar="N",
                        help="meta servers to run (default 1)")
    parser.add_argument("--base-port", type=_count(1024, 65535 - 40), default=DEFAULT_BASE_PORT,
                        metavar="PORT", help=f"first of 40 ports to use (default {DEFAULT_BASE_PORT})")
    parser.add_argument("--vip-port", type=_count(1, 65535), default=DEFAULT_VIP_PORT, metavar="PORT",
                        help=f"iSCSI port of the redirector on {VIP} (default {DEFAULT_VIP_PORT})")
    parser.add_argument("--chunk-capacity", type=_capacity, default=DEFAULT_CHUNK_CAPACITY,
                        metavar="SIZE", help=f"capacity of each chunk server's file-backed disk "
                                             f"(default {DEFAULT_CHUNK_CAPACITY})")


def add_down_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = DOWN_EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    _state_dir_argument(parser)
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for the cluster to stop (default 60)")


def _state_dir(args: argparse.Namespace) -> Path:
    given = getattr(args, "state_dir", None)
    return Path(given).expanduser().absolute() if given else default_state_dir().absolute()


# -- layout: every path and port, derived from the arguments ------------------------

@dataclass(frozen=True)
class Layout:
    state_dir: Path
    base_port: int = DEFAULT_BASE_PORT
    chunks: int = 3
    metas: int = 1
    chunk_capacity: str = DEFAULT_CHUNK_CAPACITY
    vip_port: int = DEFAULT_VIP_PORT

    @property
    def token(self) -> Path: return self.state_dir / "token"
    @property
    def client_config(self) -> Path: return self.state_dir / "zstore.toml"
    @property
    def pidfile(self) -> Path: return self.state_dir / "up.pid"
    @property
    def statefile(self) -> Path: return self.state_dir / "up.json"
    @property
    def logs(self) -> Path: return self.state_dir / "logs"
    @property
    def etcd_data(self) -> Path: return self.state_dir / "etcd"
    @property
    def etcd_endpoint(self) -> str: return f"127.0.0.1:{self.base_port}"

    def meta_port(self, i: int) -> int: return self.base_port + 10 + i
    def meta_url(self, i: int) -> str: return f"http://127.0.0.1:{self.meta_port(i)}"
    def chunk_dir(self, i: int) -> Path: return self.state_dir / f"chunk{i}"
    def data_port(self, i: int) -> int: return self.base_port + 20 + i
    def portal(self, i: int) -> str: return f"127.0.0.1:{self.base_port + 30 + i}"
    @property
    def redirector_config(self) -> Path: return self.state_dir / "redirector.toml"
    @property
    def csi_socket(self) -> Path: return self.state_dir / "csi.sock"

    def vip_url(self) -> str:
        """``iscsi://`` URL prefix of the VIP portal (port left out when it is the default)."""
        port = "" if self.vip_port == DEFAULT_VIP_PORT else f":{self.vip_port}"
        return f"iscsi://{VIP}{port}"

    def ports(self) -> list[tuple[int, str]]:
        ports = [(self.base_port, "etcd client"), (self.base_port + 1, "etcd peer")]
        ports += [(self.meta_port(i), f"meta{i}") for i in range(self.metas)]
        for i in range(self.chunks):
            ports += [(self.data_port(i), f"chunk{i} data"), (self.base_port + 30 + i, f"chunk{i} portal")]
        return ports


def find_etcd() -> str:
    for candidate in ("/usr/bin/etcd", shutil.which("etcd")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise UpError(ETCD_MISSING)


def check_ports(layout: Layout) -> None:
    if len(str(layout.csi_socket).encode()) > UNIX_PATH_MAX:
        raise UpError(f"the state dir path is too long for a unix socket in it ({layout.csi_socket}); "
                      "choose a shorter --state-dir")
    for port, what in layout.ports():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                last = layout.base_port + 39
                raise UpError(f"port {port} ({what}) is in use; start on other ports with "
                              f"--base-port (this cluster uses {layout.base_port}-{last})") from None
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((VIP, layout.vip_port))
        except OSError as e:
            raise UpError(f"port {layout.vip_port} on {VIP} (the redirector's VIP) is unusable: "
                          f"{e.strerror}; choose another with --vip-port") from None


# -- files in the state dir --------------------------------------------------------

def _write(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def ensure_token(path: Path) -> None:
    """Make the cluster token once; afterwards keep it (and its 0600 mode)."""
    if path.exists() and path.read_text().strip():
        path.chmod(0o600)
        return
    _write(path, secrets.token_urlsafe(32) + "\n", 0o600)


def write_configs(layout: Layout) -> None:
    import tomli_w
    etcd = {"endpoints": [layout.etcd_endpoint], "prefix": PREFIX}
    for i in range(layout.metas):
        _write(layout.state_dir / f"meta{i}.toml", tomli_w.dumps({"etcd": etcd, "meta": {
            "listen": f"127.0.0.1:{layout.meta_port(i)}", "advertise_url": layout.meta_url(i),
            "meta_id": f"meta{i}", "token_file": str(layout.token), "lease_ttl": 5}}))
    for i in range(layout.chunks):
        d = layout.chunk_dir(i)
        _write(layout.state_dir / f"chunk{i}.toml", tomli_w.dumps({"etcd": etcd, "chunk": {
            "data_dir": str(d), "disks": [f"{d / 'disk0'}:{layout.chunk_capacity}"],
            "address": "127.0.0.1", "data_port": layout.data_port(i), "portal": layout.portal(i),
            "labels": {"zone": f"z{i}"}, "lease_ttl": 5},
            # chunk servers call the meta leader (extent allocation, replica drops)
            "client": {"token_file": str(layout.token)}}))
    _write(layout.redirector_config, tomli_w.dumps({"etcd": etcd, "redirector": {
        "vip": VIP, "port": layout.vip_port, "redirector_id": "redirector0", "lease_ttl": 3}}))
    # Paths relative to this file's directory, so the CLI works from anywhere.
    _write(layout.client_config, tomli_w.dumps({
        "client": {"endpoints": [layout.meta_url(i) for i in range(layout.metas)], "token_file": "token"},
        "etcd": etcd}))


class PidLock:
    """``up.pid``: holds the supervisor's pid, flock'ed for exactly as long as it runs.

    The lock (not the file's existence) says whether a supervisor runs, so a
    pid file left by a killed supervisor never blocks the next ``up``.
    """

    ATTEMPTS = 10                  # opens of up.pid before giving up (each one lost a race)

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        # A stopping supervisor unlinks the file and then unlocks it: a file opened before
        # the unlink can be locked afterwards, with no up.pid on disk naming it. So the lock
        # counts only if it is on the file the path names now; otherwise open it again.
        for _ in range(self.ATTEMPTS):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                pid = read_pid(self.path)
                raise UpError(f"a cluster is already running from {self.path.parent} "
                              f"(pid {pid or '?'}); stop it with zstore down") from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)
        else:
            raise UpError(f"{self.path} keeps being replaced while it is locked; "
                          "is another zstore up starting and stopping there?")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (st.st_dev, st.st_ino)


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def running_supervisor(state_dir: Path) -> int | None:
    """The pid of the ``up`` holding ``state_dir``, or None if none runs."""
    path = state_dir / "up.pid"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_pid(path) or -1
    finally:
        os.close(fd)
    return None


def leftover_children(state_dir: Path) -> list[tuple[str, int]]:
    """Children a vanished supervisor left running (checked by pid and command line)."""
    try:
        state = json.loads((state_dir / "up.json").read_text())
    except (OSError, ValueError):
        return []
    found = []
    for c in state.get("children", []):
        try:
            cmdline = Path(f"/proc/{int(c['pid'])}/cmdline").read_bytes()
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if str(state_dir).encode() in cmdline:
            found.append((str(c.get("name")), int(c["pid"])))
    return found


# -- children ----------------------------------------------------------------------

# On Linux, run each child through this: it asks for SIGTERM when the supervisor
# dies, then execs the real program (the setting survives exec).
_PDEATHSIG = ("import ctypes,os,signal,sys\n"
              "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
              "sys.exit(0) if os.getppid() != int(sys.argv[1]) else os.execv(sys.argv[2], sys.argv[2:])\n")


def child_env() -> dict[str, str]:
    """The supervisor's environment without ZSTORE_* (which would override the child configs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZSTORE_")}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if platform.machine() in ("aarch64", "arm64"):
        env.setdefault("ETCD_UNSUPPORTED_ARCH", "arm64")
    return env


@dataclass
class Child:
    name: str
    kind: str                      # etcd | meta | redirector | chunk | csi
    argv: list[str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    announced: bool = False

    @property
    def exited(self) -> bool:
        return self.proc is not None and self.proc.returncode is not None

    async def start(self, cwd: Path) -> None:
        argv = self.argv
        if sys.platform.startswith("linux"):
            argv = [sys.executable, "-c", _PDEATHSIG, str(os.getpid()), *argv]
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== zstore up: starting {self.name} at {time.strftime('%F %T')} ===\n".encode())
            log.flush()
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
                cwd=cwd, env=child_env(), start_new_session=True)

    def signal(self, sig: int) -> None:
        if self.proc is None or self.exited:
            return
        try:
            os.killpg(self.proc.pid, sig)        # its own session: the group id is its pid
        except ProcessLookupError:
            pass
        except PermissionError:
            self.proc.send_signal(sig)

    async def stop(self, grace: float = STOP_GRACE) -> None:
        if self.proc is None or self.exited:
            return
        self.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), grace)
        except asyncio.TimeoutError:
            say(f"{self.name} did not stop within {grace:.0f}s; killing it", err=True)
            self.signal(signal.SIGKILL)
            await self.proc.wait()

    def describe_exit(self) -> str:
        rc = self.proc.returncode if self.proc else None
        if rc is not None and rc < 0:
            try:
                return f"was killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"was killed by signal {-rc}"
        return f"exited with code {rc}"

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").rstrip().splitlines()[-lines:]
        except OSError:
            return ""
        return "\n".join("    " + line for line in text)


def say(text: str, err: bool = False) -> None:
    """Print a progress line; never raises.

    The output may be gone while the cluster runs: the terminal hung up (EIO after
    an ssh drop) or the reader of a pipe died (EPIPE from a ``| tee`` killed by the
    same Ctrl-C). A print must then not abandon a signal handler or the ordered
    shutdown. A broken stream is pointed at /dev/null, so the lines still buffered
    in it do not fail again (and turn the exit status into 120) at exit.
    """
    stream = sys.stderr if err else sys.stdout
    try:
        print(text, file=stream, flush=True)
    except OSError:
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, stream.fileno())
            finally:
                os.close(null)
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    except ValueError:               # closed stream
        pass


# -- the supervisor -----------------------------------------------------------------

class Interrupted(Exception):
    """Stop was asked for while starting."""


@dataclass
class Supervisor:
    layout: Layout
    etcd_bin: str
    children: list[Child] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False
    chunk_ids: dict[str, str] = field(default_factory=dict)
    leader: str | None = None
    _tasks: set[asyncio.Task] = field(default_factory=set)
    _etcd: Any = None

    # startup

    async def start_all(self) -> None:
        lay = self.layout
        url, peer = f"http://{lay.etcd_endpoint}", f"http://127.0.0.1:{lay.base_port + 1}"
        etcd = await self.spawn("etcd", "etcd", [
            self.etcd_bin, "--name", "zstore", "--data-dir", str(lay.etcd_data),
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"zstore={peer}", "--log-level", "warn",
            "--auto-compaction-retention", "1"])
        await self.wait_until(f"etcd on {lay.etcd_endpoint}", [etcd],
                              lambda: _port_open(lay.base_port))

        metas = [await self.spawn(f"meta{i}", "meta", [
            sys.executable, "-m", "meta.server", "--config", str(lay.state_dir / f"meta{i}.toml")])
            for i in range(lay.metas)]
        for i, m in enumerate(metas):
            await self.wait_until(f"meta{i} health at {lay.meta_url(i)}", [m],
                                  lambda i=i: _health(lay.meta_port(i)))
        # Before the chunk servers: it needs only etcd, and answers "service unavailable"
        # until one is up.
        redirector = await self.spawn("redirector", "redirector", [
            sys.executable, "-m", "redirector.server", "--config", str(lay.redirector_config)])
        await self.wait_until(f"redirector on {VIP}:{lay.vip_port}", [redirector],
                              lambda: _port_open(lay.vip_port, VIP))
        chunks = [await self.spawn(f"chunk{i}", "chunk", [
            sys.executable, "-m", "chunk.server", "--config", str(lay.state_dir / f"chunk{i}.toml")])
            for i in range(lay.chunks)]
        if chunks:
            await self.wait_until(f"{len(chunks)} chunk servers registered in etcd", chunks,
                                  self._chunks_live)
        if metas:
            self.leader = await self.wait_until("a meta leader", metas, self._leader,
                                                timeout=LEADER_TIMEOUT, required=False)
        # Last: a client of the meta API like any other (Probe says "not ready" without a leader).
        csi = await self.spawn("csi", "csi", [
            sys.executable, "-m", "csi.server", "--endpoint", f"unix://{lay.csi_socket}",
            "--mode", "controller", "--config", str(lay.client_config),
            "--portal", f"{VIP}:{lay.vip_port}"])
        await self.wait_until(f"CSI driver on {lay.csi_socket}", [csi],
                              lambda: csi_plugin_name(lay.csi_socket))

    async def spawn(self, name: str, kind: str, argv: list[str]) -> Child:
        child = Child(name, kind, argv, self.layout.logs / f"{name}.log")
        await child.start(self.layout.state_dir)
        self.children.append(child)
        self.write_state()
        task = asyncio.ensure_future(self._watch(child))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return child

    async def wait_until(self, what: str, watched: list[Child], cond: Callable[[], Awaitable[Any]],
                         timeout: float = READY_TIMEOUT, required: bool = True) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            if self.stop.is_set():
                raise Interrupted
            self.check_started(watched)
            value = await cond()
            if value:
                say(f"  ready: {what}")
                return value
            if time.monotonic() >= deadline:
                if not required:
                    return None
                logs = ", ".join(str(c.log_path) for c in watched)
                raise UpError(f"timed out after {timeout:.0f}s waiting for {what}; see {logs}")
            try:
                await asyncio.wait_for(self.stop.wait(), 0.2)
            except asyncio.TimeoutError:
                pass

    def check_started(self, watched: Sequence[Child] = ()) -> None:
        """UpError if any child started so far (not only this stage's) has exited."""
        for c in [*watched, *self.children]:
            if c.exited:
                raise UpError(f"{c.name} {c.describe_exit()} while starting; "
                              f"last lines of {c.log_path}:\n{c.log_tail()}")

    async def _chunks_live(self) -> bool:
        from zstore import etcd as zetcd
        from zstore.config import EtcdConfig
        from zstore.keys import Keys
        from zstore.records import ChunkLive
        for i in range(self.layout.chunks):
            path = self.layout.chunk_dir(i) / "chunk-id"
            if path.exists() and path.read_text().strip():
                self.chunk_ids[f"chunk{i}"] = path.read_text().strip()
        if len(self.chunk_ids) < self.layout.chunks:
            return False
        if self._etcd is None:
            self._etcd = zetcd.client(EtcdConfig(endpoints=[self.layout.etcd_endpoint], prefix=PREFIX,
                                                 timeout=2))
        keys = Keys(PREFIX)
        pids = {c.name: c.proc.pid for c in self.children if c.kind == "chunk" and c.proc is not None}
        try:
            for name, cid in self.chunk_ids.items():
                got = await self._etcd.get(keys.chunk_live(cid))
                # The record must be this run's: etcd keeps leases across its restart (and
                # grants them their TTL again), so after a supervisor was SIGKILLed the live
                # record of the previous chunk server is still there for a while.
                if got is None or ChunkLive.decode(got.value).pid != pids.get(name):
                    return False
            return True
        except Exception:  # noqa: BLE001 - not ready yet
            return False

    async def _leader(self) -> str | None:
        for i in range(self.layout.metas):
            health = await _health(self.layout.meta_port(i))
            if health and health.get("leader"):
                return str(health.get("meta_id") or f"meta{i}")
        return None

    async def _watch(self, child: Child) -> None:
        assert child.proc is not None
        await child.proc.wait()
        if not self.stopping:
            say(f"!! {child.name} {child.describe_exit()} (not restarted); log: {child.log_path}", err=True)
            self.write_state()

    # steady state and shutdown

    def write_state(self) -> None:
        lay = self.layout
        state = {
            "pid": os.getpid(), "state_dir": str(lay.state_dir), "base_port": lay.base_port,
            "etcd": lay.etcd_endpoint, "metas": [lay.meta_url(i) for i in range(lay.metas)],
            "config": str(lay.client_config), "leader": self.leader,
            "redirector": {"vip": VIP, "port": lay.vip_port, "url": lay.vip_url()},
            "csi": {"endpoint": f"unix://{lay.csi_socket}", "mode": "controller"},
            "children": [{"name": c.name, "kind": c.kind, "pid": c.proc.pid if c.proc else None,
                          "alive": not c.exited, "log": str(c.log_path)} for c in self.children],
            "chunks": [{"name": f"chunk{i}", "chunk_id": self.chunk_ids.get(f"chunk{i}"),
                        "portal": lay.portal(i), "data_port": lay.data_port(i), "zone": f"z{i}"}
                       for i in range(lay.chunks)],
        }
        _write(lay.statefile, json.dumps(state, indent=2) + "\n")

    def banner(self) -> str:
        lay = self.layout
        lines = ["", f"zstore is up: {lay.metas} meta, {lay.chunks} chunk server(s)",
                 f"  etcd       {lay.etcd_endpoint}"]
        for i in range(lay.metas):
            mark = "  (leader)" if self.leader == f"meta{i}" else ""
            lines.append(f"  meta{i}      {lay.meta_url(i)}{mark}")
        if lay.metas and not self.leader:
            lines.append("             (no leader elected yet)")
        for i in range(lay.chunks):
            cid = self.chunk_ids.get(f"chunk{i}", "?")
            lines.append(f"  chunk{i}     {cid}  portal {lay.portal(i)}  zone z{i}")
        lines.append(f"  iSCSI VIP  {lay.vip_url()}/<target>/<lun>  (discovery: iscsi-ls {lay.vip_url()})")
        lines.append(f"  CSI        unix://{lay.csi_socket}  (csi.zstore.io, controller)")
        lines += [f"  state dir  {lay.state_dir}", f"  config     {lay.client_config}",
                  f"  logs       {lay.logs}/"]
        if lay.state_dir != default_state_dir().absolute():
            lines.append(f"export ZSTORE_CONFIG={lay.client_config}")
        lines += ["try: zstore cluster status", "Ctrl-C or `zstore down` stops the cluster.", ""]
        return "\n".join(lines)

    def on_signal(self, sig: signal.Signals) -> None:
        # Act first, then tell: nothing printed may keep the signal from taking effect.
        if self.stop.is_set():
            for c in self.children:
                c.signal(signal.SIGKILL)
            say(f"got {sig.name} again: killing everything now", err=True)
            return
        self.stop.set()
        say(f"\ngot {sig.name}: stopping the cluster", err=True)

    async def shutdown(self) -> None:
        self.stopping = True
        for kind, label in (("csi", "CSI driver"), ("redirector", "redirector"), ("chunk", "chunk servers"),
                            ("meta", "meta servers"), ("etcd", "etcd")):
            group = [c for c in self.children if c.kind == kind and not c.exited]
            if group:
                say(f"stopping {label} ...")
                await asyncio.gather(*(c.stop() for c in group))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self.on_signal, sig)
        rc = 0
        try:
            say(f"starting zstore in {self.layout.state_dir} ...")
            await self.start_all()
            # Each stage watched only its own children: one of an earlier stage may have died
            # since. "zstore is up" is said only when every child still runs.
            self.check_started()
            self.write_state()
            say(self.banner())
            await self.stop.wait()
        except Interrupted:
            say("interrupted while starting")
        except UpError as e:
            say(f"zstore up: error: {e}", err=True)
            rc = 1
        finally:
            if self._etcd is not None:
                try:
                    await asyncio.wait_for(self._etcd.close(), 2)
                except Exception:  # noqa: BLE001 - shutting down anyway
                    pass
            await self.shutdown()
        say(f"stopped; state kept in {self.layout.state_dir} (zstore up brings the same cluster back)")
        return rc


async def _health(port: int) -> dict[str, Any] | None:
    """The meta server's GET /api/v1/health answer, or None."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        writer.write(f"GET /api/v1/health HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), 2)
        head, _, body = raw.partition(b"\r\n\r\n")
        if head.split(b" ", 2)[1:2] != [b"200"]:
            return None
        data = json.loads(body)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError, IndexError, asyncio.TimeoutError):
        return None
    finally:
        writer.close()


async def csi_plugin_name(sock: Path) -> str | None:
    """The plugin name GetPluginInfo answers on ``sock``, or None while it does not answer."""
    if not sock.is_socket():
        return None
    import grpc
    from csi import csi_pb2 as pb
    from csi import csi_pb2_grpc as pbg
    try:
        async with grpc.aio.insecure_channel(f"unix:{sock}") as ch:
            info = await pbg.IdentityStub(ch).GetPluginInfo(pb.GetPluginInfoRequest(), timeout=2)
    except grpc.aio.AioRpcError:
        return None
    return info.name or None


async def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


# -- the commands -----------------------------------------------------------------

def run_up(args: argparse.Namespace) -> int:
    layout = Layout(_state_dir(args), base_port=getattr(args, "base_port", DEFAULT_BASE_PORT),
                    chunks=getattr(args, "chunks", 3), metas=getattr(args, "metas", 1),
                    chunk_capacity=getattr(args, "chunk_capacity", DEFAULT_CHUNK_CAPACITY),
                    vip_port=getattr(args, "vip_port", DEFAULT_VIP_PORT))
    lock = PidLock(layout.pidfile)
    try:
        etcd_bin = find_etcd()
        layout.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        layout.logs.mkdir(exist_ok=True)
        lock.acquire()
        leftovers = leftover_children(layout.state_dir)
        if leftovers:
            names = ", ".join(f"{n} (pid {p})" for n, p in leftovers)
            raise UpError(f"processes of an earlier run are still running: {names}; "
                          "stop them with zstore down")
        check_ports(layout)
        ensure_token(layout.token)
        write_configs(layout)
    except (UpError, OSError) as e:
        lock.release()
        msg = str(e) if isinstance(e, UpError) else f"cannot prepare {layout.state_dir}: {e}"
        say(f"zstore up: error: {msg}", err=True)
        return 1
    try:
        return asyncio.run(Supervisor(layout, etcd_bin).run())
    finally:
        layout.statefile.unlink(missing_ok=True)
        lock.release()


def run_down(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    timeout = float(getattr(args, "timeout", 60.0))
    pid = running_supervisor(state_dir)
    if pid is None:
        leftovers = leftover_children(state_dir)
        if leftovers:
            return _stop_leftovers(state_dir, leftovers)
        say(f"no cluster is running from {state_dir}; nothing to stop")
        return 0
    if pid < 0:
        say(f"zstore down: error: {state_dir}/up.pid is locked but holds no pid", err=True)
        return 1
    say(f"stopping the cluster in {state_dir} (pid {pid}) ...")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while running_supervisor(state_dir) is not None:
        if time.monotonic() >= deadline:
            say(f"zstore down: error: the cluster (pid {pid}) is still stopping after {timeout:.0f}s; "
                f"see {state_dir}/logs/", err=True)
            return 1
        time.sleep(0.1)
    say("stopped")
    return 0


def _stop_leftovers(state_dir: Path, leftovers: list[tuple[str, int]]) -> int:
    """The supervisor is gone but children are not: stop them, the CSI driver, redirector and chunks first."""
    say(f"the zstore up of {state_dir} is gone but left {len(leftovers)} process(es); stopping them")
    order = {"csi": 0, "redirector": 0, "chunk": 1, "meta": 2, "etcd": 3}
    for _, group in sorted(_group(leftovers, order).items()):
        for _, pid in group:
            _kill_quietly(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while any(_alive(p) for _, p in group) and time.monotonic() < deadline:
            time.sleep(0.1)
        for _, pid in group:
            _kill_quietly(pid, signal.SIGKILL)
    (state_dir / "up.json").unlink(missing_ok=True)
    say("stopped")
    return 0


def _group(items: list[tuple[str, int]], order: dict[str, int]) -> dict[int, list[tuple[str, int]]]:
    out: dict[int, list[tuple[str, int]]] = {}
    for name, pid in items:
        rank = next((r for prefix, r in order.items() if name.startswith(prefix)), 0)
        out.setdefault(rank, []).append((name, pid))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def _kill_quietly(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m zstore.up [up] [options]`` or ``python -m zstore.up down [options]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("up", "down") else "up"
    parser = argparse.ArgumentParser(prog=f"zstore {command}")
    (add_down_arguments if command == "down" else add_up_arguments)(parser)
    args = parser.parse_args(argv)
    return run_down(args) if command == "down" else run_up(args)


if __name__ == "__main__":
    sys.exit(main())
