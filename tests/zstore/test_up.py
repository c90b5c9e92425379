"""``zstore up`` / ``zstore down``: the one-command local cluster, end to end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.cluster import PY, ROOT, free_port, free_port_range, wait_for

BANNER_END = "try: zstore cluster status"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ZSTORE_")}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _survivors(up: "Up") -> str:
    """What a failed "children exit" check found: each live child's command line and kernel
    wait channel, and the last lines of every log in the state dir (which child hung, where)."""
    out = []
    for pid in up.child_pids:
        if _alive(pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
                wchan = Path(f"/proc/{pid}/wchan").read_text()
            except OSError:
                continue
            out.append(f"alive: {pid} {cmd[-160:]} (wchan {wchan})")
    for log in sorted(up.state.rglob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-8:]
        out.append(f"--- {log.name}:\n" + "\n".join(tail))
    return "\n".join(out)


class Up:
    """One ``python -m zstore.up`` supervisor started by a test, always cleaned up."""

    def __init__(self, state: Path, base: int, *extra: str) -> None:
        self.state, self.base = state, base
        self.out = state.parent / f"up-{base}-{len(list(state.parent.glob('up-*.out')))}.out"
        if "--vip-port" not in extra:       # 3260 on 127.0.0.2 may be another cluster's on this host
            extra = ("--vip-port", str(free_port("127.0.0.2")), *extra)
        with open(self.out, "wb") as f:
            self.popen = subprocess.Popen(
                [PY, "-m", "zstore.up", "--state-dir", str(state), "--base-port", str(base), *extra],
                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=_env(),
                start_new_session=True)
        self.child_pids: list[int] = []

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_banner(self, timeout: float = 90) -> None:
        def ready():
            assert self.popen.poll() is None, f"zstore up exited {self.popen.returncode}:\n{self.output()}"
            return BANNER_END in self.output()
        wait_for(ready, timeout, "the zstore up banner")
        state = json.loads((self.state / "up.json").read_text())
        self.child_pids = [c["pid"] for c in state["children"]]

    def kill(self) -> None:
        """Last-resort cleanup: SIGKILL the supervisor's group and every child it recorded."""
        try:
            self.child_pids += [c["pid"] for c in json.loads((self.state / "up.json").read_text())["children"]]
        except (OSError, ValueError, KeyError):
            pass
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
        for pid in self.child_pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def api(base: int, path: str, token: str) -> object:
    req = urllib.request.Request(f"http://127.0.0.1:{base + 10}/api/v1{path}",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def zstore_down(state: Path) -> subprocess.CompletedProcess:
    """Through the real CLI when it is there, as a user would type it."""
    return subprocess.run([PY, "-m", "zstore.cli.main", "down", "--state-dir", str(state)],
                          capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=90)


def csi_identity(sock: Path):
    """GetPluginInfo and Probe over the driver's unix socket, as kubelet's sidecars call them."""
    import grpc
    from csi import csi_pb2 as pb
    from csi import csi_pb2_grpc as pbg
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        ident = pbg.IdentityStub(ch)
        info = ident.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=10)
        ready = ident.Probe(pb.ProbeRequest(), timeout=10).ready.value
    return info, ready


@pytest.mark.slow
def test_up_down_up(tmp_path: Path):
    state = tmp_path / "state"
    base = free_port_range(40)
    first = Up(state, base)
    second: Up | None = None
    try:
        first.wait_banner()
        out = first.output()
        assert f"meta0      http://127.0.0.1:{base + 10}  (leader)" in out
        assert f"export ZSTORE_CONFIG={state}/zstore.toml" in out
        token = (state / "token").read_text().strip()
        assert (state / "token").stat().st_mode & 0o777 == 0o600
        assert int((state / "up.pid").read_text()) == first.popen.pid

        ids = sorted((state / f"chunk{i}" / "chunk-id").read_text().strip() for i in range(3))
        chunks = api(base, "/chunks", token)["chunks"]
        assert sorted(c["chunk_id"] for c in chunks) == ids
        assert {c["status"] for c in chunks} == {"up"}
        assert sorted(c["labels"]["zone"] for c in chunks) == ["z0", "z1", "z2"]
        assert sorted(c["portal"] for c in chunks) == [f"127.0.0.1:{base + 30 + i}" for i in range(3)]
        assert api(base, "/meta/leader", token)["meta_id"] == "meta0"

        # The CSI driver (controller) answers on the socket the banner names.
        assert f"CSI        unix://{state}/csi.sock" in out
        assert json.loads((state / "up.json").read_text())["csi"]["endpoint"] == f"unix://{state}/csi.sock"
        info, ready = csi_identity(state / "csi.sock")
        assert info.name == "csi.zstore.io" and ready

        for pid in first.child_pids:          # the token is never on a command line or in a log
            assert token.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert all(token not in p.read_text(errors="replace") for p in (state / "logs").iterdir())

        # A second supervisor on the same state dir is refused, naming the running one.
        r = subprocess.run([PY, "-m", "zstore.up", "--state-dir", str(state), "--base-port", str(base)],
                           capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=60)
        assert r.returncode == 1
        assert f"already running from {state} (pid {first.popen.pid}); stop it with zstore down" in r.stderr

        # A dead chunk server is reported, not restarted, and the cluster sees it down.
        chunk1 = next(c for c in json.loads((state / "up.json").read_text())["children"]
                      if c["name"] == "chunk1")
        os.kill(chunk1["pid"], signal.SIGKILL)
        wait_for(lambda: "!! chunk1 was killed by SIGKILL (not restarted)" in first.output(), 10,
                 "the supervisor to report chunk1")
        wait_for(lambda: sum(c["status"] == "down" for c in api(base, "/chunks", token)["chunks"]) == 1,
                 15, "chunk1 shown down")
        assert first.popen.poll() is None

        r = zstore_down(state)
        assert r.returncode == 0 and "stopped" in r.stdout, r.stdout + r.stderr
        assert first.popen.wait(5) == 0
        assert not (state / "up.pid").exists()
        assert not [pid for pid in first.child_pids if _alive(pid)]
        out = first.output()
        assert out.index("stopping CSI driver") < out.index("stopping chunk servers")
        assert out.index("stopping chunk servers") < out.index("stopping meta servers") < out.index("stopping etcd")

        r = zstore_down(state)
        assert r.returncode == 0 and "no cluster is running" in r.stdout

        # Up again: same token, same chunk ids, all three back.
        second = Up(state, base)
        second.wait_banner()
        assert (state / "token").read_text().strip() == token
        assert sorted((state / f"chunk{i}" / "chunk-id").read_text().strip() for i in range(3)) == ids
        wait_for(lambda: sorted(c["chunk_id"] for c in api(base, "/chunks", token)["chunks"]
                                if c["status"] == "up") == ids, 20, "the same three chunk servers up")
        second.popen.send_signal(signal.SIGINT)        # Ctrl-C stops it as well
        assert second.popen.wait(60) == 0
        assert not [pid for pid in second.child_pids if _alive(pid)]
    finally:
        for up in (first, second):
            if up is not None:
                up.kill()


@pytest.mark.slow
def test_supervisor_killed_takes_children_with_it(tmp_path: Path):
    up = Up(tmp_path / "state", free_port_range(40), "--chunks", "1")
    try:
        up.wait_banner()
        os.kill(up.popen.pid, signal.SIGKILL)
        up.popen.wait(10)
        try:
            wait_for(lambda: not [p for p in up.child_pids if _alive(p)], 20, "orphaned children to exit")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{_survivors(up)}") from None
        r = zstore_down(tmp_path / "state")        # stale up.pid: nothing runs
        assert r.returncode == 0 and "no cluster is running" in r.stdout
    finally:
        up.kill()


def test_port_in_use_is_named(tmp_path: Path):
    base = free_port_range(40)
    with socket.socket() as s:
        s.bind(("127.0.0.1", base + 10))
        s.listen()
        r = subprocess.run([PY, "-m", "zstore.up", "--state-dir", str(tmp_path), "--base-port", str(base)],
                           capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=60)
    assert r.returncode == 1
    assert f"port {base + 10} (meta0) is in use" in r.stderr and "--base-port" in r.stderr
    assert not (tmp_path / "up.pid").exists()


def test_bad_arguments_exit_2(tmp_path: Path):
    r = subprocess.run([PY, "-m", "zstore.up", "--state-dir", str(tmp_path), "--chunks", "11"],
                       capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=60)
    assert r.returncode == 2 and "--chunks: must be between 0 and 10" in r.stderr


def test_etcd_missing_is_explained(monkeypatch):
    from zstore import up
    monkeypatch.setattr(up.os, "access", lambda *_a, **_k: False)
    with pytest.raises(up.UpError, match="etcd not found; install Debian's etcd-server"):
        up.find_etcd()


def test_down_with_nothing_running(tmp_path: Path):
    r = subprocess.run([PY, "-m", "zstore.up", "down", "--state-dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=60)
    assert r.returncode == 0 and f"no cluster is running from {tmp_path}" in r.stdout
