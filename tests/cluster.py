"""The one place tests start real processes: etcd, meta, chunk servers, redirectors, the CLI.

Everything binds 127.0.0.1 on ports the kernel hands out, runs in a temp
directory, and is stopped (SIGTERM, then SIGKILL) by the fixture that made it.
Waits poll a condition with a deadline; nothing sleeps for a fixed time and
hopes.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    """Poll ``cond`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - remembered for the failure message
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (f" (last error: {last_exc!r})" if last_exc else ""))


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen | None = None

    def start(self) -> "Proc":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")
        self.popen = subprocess.Popen(self.argv, stdout=logf, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=self.env, cwd=ROOT,
                                      start_new_session=True)
        logf.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 10) -> None:
        if not self.alive():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Etcd:
    """A real etcd on loopback, optionally with mutual TLS."""
    workdir: Path
    tls: dict[str, str] | None = None     # ca_file, cert_file, key_file (server side)
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    proc: Proc | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 20) -> "Etcd":
        scheme = "https" if self.tls else "http"
        url = f"{scheme}://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [ETCD, "--name", "t", "--data-dir", str(self.workdir / "etcd-data"),
                "--listen-client-urls", url, "--advertise-client-urls", url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"t={peer}", "--log-level", "warn"]
        if self.tls:
            argv += ["--cert-file", self.tls["cert_file"], "--key-file", self.tls["key_file"],
                     "--trusted-ca-file", self.tls["ca_file"], "--client-cert-auth"]
        env = dict(os.environ, ETCD_UNSUPPORTED_ARCH=os.environ.get("ETCD_UNSUPPORTED_ARCH", ""))
        self.proc = Proc("etcd", argv, self.workdir / "etcd.log", env=env).start()
        wait_for(lambda: port_open(self.client_port) or not self.proc.alive(), timeout, "etcd port")
        if not self.proc.alive():
            raise RuntimeError("etcd exited:\n" + self.proc.log())
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def kill(self) -> None:
        if self.proc:
            self.proc.kill()


def unique_prefix() -> str:
    return f"/t-{uuid.uuid4().hex[:10]}"


def write_config(path: Path, sections: dict[str, dict]) -> Path:
    import tomli_w
    path.write_text(tomli_w.dumps({k: {kk: vv for kk, vv in v.items() if vv is not None}
                                   for k, v in sections.items()}))
    return path


@dataclass
class Cluster:
    """etcd (shared) + meta servers + chunk servers for one test, under its own prefix."""
    workdir: Path
    etcd: Etcd
    prefix: str = field(default_factory=unique_prefix)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    metas: list[Proc] = field(default_factory=list)
    meta_ports: list[int] = field(default_factory=list)
    chunks: list[Proc] = field(default_factory=list)
    portals: list[int] = field(default_factory=list)      # iSCSI portal port of chunk i
    redirectors: list[Proc] = field(default_factory=list)
    vips: list[tuple[str, int]] = field(default_factory=list)   # (VIP, port) of redirector i
    lease_ttl: int = 3

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.token_file = self.workdir / "token"
        self.token_file.write_text(self.token + "\n")
        self.token_file.chmod(0o600)

    @property
    def client_config(self) -> Path:
        return self.workdir / "client.toml"

    def _write_client_config(self) -> None:
        write_config(self.client_config, {
            "client": {"endpoints": [f"http://127.0.0.1:{p}" for p in self.meta_ports],
                       "token_file": str(self.token_file), "timeout": 10.0},
            "etcd": {"endpoints": [self.etcd.endpoint], "prefix": self.prefix},
        })

    def start_meta(self, wait: bool = True, options: dict | None = None) -> Proc:
        port = free_port()
        i = len(self.metas)
        cfg = write_config(self.workdir / f"meta{i}.toml", {
            "etcd": {"endpoints": [self.etcd.endpoint], "prefix": self.prefix},
            "meta": {"listen": f"127.0.0.1:{port}", "token_file": str(self.token_file),
                     "lease_ttl": self.lease_ttl, "meta_id": f"meta{i}", **(options or {})},
        })
        p = Proc(f"meta{i}", [PY, "-m", "meta.server", "--config", str(cfg)],
                 self.workdir / f"meta{i}.log").start()
        self.metas.append(p)
        self.meta_ports.append(port)
        self._write_client_config()
        if wait:
            wait_for(lambda: port_open(port) or not p.alive(), 20, f"meta{i} port")
            assert p.alive(), p.log()
        return p

    def _data_port(self, i: int) -> int:
        """A chunk server keeps its replication port across restarts, as in production."""
        ports = self.__dict__.setdefault("_data_ports", {})
        if i not in ports:
            ports[i] = free_port()
        return ports[i]

    def start_chunk(self, labels: dict[str, str] | None = None, capacity: str = "10Gi",
                    index: int | None = None, options: dict | None = None,
                    disks: list[str] | None = None, wrapper: str | None = None) -> Proc:
        """A chunk server; ``options`` adds to (or overrides) its ``[chunk]`` config.

        Without ``labels`` it gets a zone of its own (``z<i>``, as ``zstore up`` does): the test
        chunk servers share one host, and replicas are only placed in distinct failure domains.
        ``disks``: its disk entries (``name`` or ``name:capacity``, under its data dir) instead of
        one ``disk0`` of ``capacity``. ``wrapper``: Python source run instead of ``-m
        chunk.server`` (it patches something, then calls ``chunk.server.main``).
        """
        i = len(self.chunks) if index is None else index
        data = self.workdir / f"chunk{i}"
        if index is None:
            self.portals.append(free_port())
        cfg = write_config(self.workdir / f"chunk{i}.toml", {
            "etcd": {"endpoints": [self.etcd.endpoint], "prefix": self.prefix},
            "chunk": {"data_dir": str(data),
                      "disks": [f"{data}/{d}" for d in disks or [f"disk0:{capacity}"]],
                      "data_port": self._data_port(i), "portal": f"127.0.0.1:{self.portals[i]}",
                      "labels": labels if labels is not None else {"zone": f"z{i}"}, "lease_ttl": self.lease_ttl,
                      **(options or {})},
            "client": {"token_file": str(self.token_file)},
        })
        argv, env = [PY, "-m", "chunk.server"], None
        if wrapper is not None:
            script = self.workdir / f"chunk{i}-wrapper.py"
            script.write_text(wrapper)
            argv, env = [PY, str(script)], {**os.environ, "PYTHONPATH": str(ROOT)}
        p = Proc(f"chunk{i}", [*argv, "--config", str(cfg)], self.workdir / f"chunk{i}.log",
                 env=env).start()
        if index is None:
            self.chunks.append(p)
        else:
            self.chunks[index] = p
        return p

    def start_redirector(self, vip: str = "127.0.0.2", port: int | None = None, wait: bool = True,
                         **settings: object) -> Proc:
        """A redirector for this cluster's VIP; ``settings`` go to its [redirector] section.
        With ``wait``, returns once it holds the VIP and listens (only one can)."""
        i = len(self.redirectors)
        port = port or free_port(vip)
        cfg = write_config(self.workdir / f"redirector{i}.toml", {
            "etcd": {"endpoints": [self.etcd.endpoint], "prefix": self.prefix},
            "redirector": {"vip": vip, "port": port, "redirector_id": f"redirector{i}",
                           "lease_ttl": self.lease_ttl, **settings},
        })
        p = Proc(f"redirector{i}", [PY, "-m", "redirector.server", "--config", str(cfg)],
                 self.workdir / f"redirector{i}.log").start()
        self.redirectors.append(p)
        self.vips.append((vip, port))
        if wait:
            wait_for(lambda: port_open(port, vip) or not p.alive(), 30, f"redirector{i} on {vip}:{port}")
            assert p.alive(), p.log()
        return p

    def cli(self, *args: str, check: bool = False, input: str | None = None,
            env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "ZSTORE_CONFIG": str(self.client_config), **(env or {})}
        r = subprocess.run([PY, "-m", "zstore.cli.main", *args], capture_output=True, text=True,
                           env=full_env, cwd=ROOT, input=input, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"zstore {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def api(self, method: str, path: str, body: object = None, token: str | None = "default",
            meta: int = 0, timeout: float = 15) -> tuple[int, object]:
        """One raw meta API call: (HTTP status, decoded JSON body)."""
        import urllib.error
        import urllib.request
        headers = {"Content-Type": "application/json"}
        if token == "default":
            token = self.token
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(f"http://127.0.0.1:{self.meta_ports[meta]}/api/v1{path}",
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw, status = r.read(), r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        ctype_json = raw[:1] in (b"{", b"[")
        return status, (json.loads(raw) if ctype_json else raw.decode())

    def cli_json(self, *args: str) -> object:
        r = self.cli(*args, "--json", check=True)
        return json.loads(r.stdout)

    def wait_chunks_up(self, n: int, timeout: float = 30) -> list[dict]:
        def ok():
            r = self.cli("chunk", "list", "--json")
            if r.returncode != 0:
                return None
            chunks = json.loads(r.stdout)
            return chunks if sum(c["status"] == "up" for c in chunks) >= n else None
        return wait_for(ok, timeout, f"{n} chunk servers up")

    def stop(self) -> None:
        for p in self.redirectors + self.chunks + self.metas:
            p.stop()


@contextlib.contextmanager
def cluster(workdir: Path, etcd: Etcd, metas: int = 1, chunks: int = 0,
            labels: list[dict[str, str]] | None = None, meta_options: dict | None = None,
            chunk_options: dict | None = None, capacities: list[str] | None = None) -> Iterator[Cluster]:
    c = Cluster(workdir=workdir, etcd=etcd)
    try:
        for _ in range(metas):
            c.start_meta(options=meta_options)
        for i in range(chunks):
            c.start_chunk(labels=(labels[i] if labels else None), options=chunk_options,
                          **({"capacity": capacities[i]} if capacities else {}))
        yield c
    finally:
        c.stop()


async def until(cond: Callable[[], Any], what: str, timeout: float = 10.0, interval: float = 0.02, *,
                message: str | Callable[[], str] | None = None) -> Any:
    """The one async poll of the tests: run ``cond`` (a plain function or a coroutine
    function) until it returns something truthy, and return that, sleeping ``interval`` s
    between tries (0: one yield to the loop). Once ``timeout`` s have passed, fail with
    ``AssertionError("timed out waiting for {what}")``, or with ``message`` (a string, or a
    function called at that moment) where given. ``cond`` runs once more after the last
    sleep; an exception it raises ends the wait at once (``async_wait_for`` retries)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            if message is None:
                raise AssertionError(f"timed out waiting for {what}")
            raise AssertionError(message() if callable(message) else message)
        await asyncio.sleep(interval)


async def async_wait_for(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    """``wait_for`` for async tests (``until`` that counts an exception of ``cond`` as not
    yet): ``cond`` may be a coroutine function."""
    last_exc: Exception | None = None

    async def attempt() -> object:
        nonlocal last_exc
        try:
            value = cond()
            return (await value) if inspect.isawaitable(value) else value
        except Exception as e:  # noqa: BLE001 - remembered for the failure message
            last_exc = e
            return None

    return await until(attempt, what, timeout, interval,
                       message=lambda: f"timed out after {timeout}s waiting for {what}"
                       + (f" (last error: {last_exc!r})" if last_exc else ""))


def free_port_range(n: int, start: int = 20000, end: int = 60000) -> int:
    """A base port ``b`` with ``b .. b+n-1`` all free on 127.0.0.1 right now."""
    import random
    for _ in range(200):
        base = random.randrange(start, end - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found")
