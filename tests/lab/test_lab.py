"""Kernel lab tests: a stock Debian kernel under qemu (TCG) with open-iscsi, on a tap inside
a private network namespace. See tests/lab/README.md.

The image is built on first use and cached in $ZSTORE_LAB_DIR (default /tmp/zstore-lab);
build-image.sh is a no-op when it is up to date. Each test is bounded by a pytest timeout, and
the scripts are run in their own process group so that a timeout still tears down qemu, tgtd
and the netns through the scripts' own traps.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parent
STATE = Path(os.environ.get("ZSTORE_LAB_DIR", "/tmp/zstore-lab"))
LOGS = STATE / "pytest-logs"
BUILD_TIMEOUT = 360      # from scratch: ~70 s plus apt downloads
VM_TIMEOUT = 240         # one TCG boot + test takes 20-40 s; generous for a loaded CI machine

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the kernel lab needs root (netns, tap, debootstrap)"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 missing (apt-get install qemu-system-x86)"),
]


def run_script(name: str, argv: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a lab script with its output in LOGS/name.log; return (exit status, output).

    On a timeout, or when pytest-timeout interrupts us, the script's process group gets SIGTERM
    first: the lab scripts trap it and stop what they started (qemu, tgtd, netns)."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"{name}.log"
    with open(log_path, "wb") as log:
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, "LAB_QUIET": "1", **(env or {})},
                             start_new_session=True)
        try:
            rc = p.wait(timeout)
        except BaseException:
            _stop_group(p)
            raise
    return rc, log_path.read_text(errors="replace")


def _stop_group(p: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


def guest_log(out: str) -> str:
    """What the guest script printed (run-vm.sh names its run dir; the console there has the
    kernel's messages too, which is what to read when the guest did not get that far)."""
    for line in out.splitlines():
        if line.startswith("run-vm: run dir "):
            run = Path(line.split()[3])
            for f in (run / "job" / "guest.log", run / "console.log"):
                if f.exists():
                    return f.read_text(errors="replace")
    return ""


@pytest.fixture(scope="module")
def lab_image() -> Path:
    """The VM image, built if missing or stale (cached across runs in $ZSTORE_LAB_DIR)."""
    t0 = time.monotonic()
    rc, out = run_script("build-image", [str(LAB / "build-image.sh")], BUILD_TIMEOUT)
    assert rc == 0, f"build-image.sh failed ({rc}):\n{tail(out)}"
    print(f"lab image ready in {time.monotonic() - t0:.0f}s")
    return STATE / "image"


@pytest.mark.timeout(BUILD_TIMEOUT + VM_TIMEOUT + 60)
def test_kernel_initiator_against_reference_tgtd(lab_image):
    """Lab test 1 in tap mode: the guest's open-iscsi against Debian's tgtd in the lab netns
    (discovery, login, mkfs.ext4, mount, write/read, logout; then the host checks the LUN file).
    It proves the lab itself works, so a failure of the zstore test below is zstore's."""
    rc, out = run_script("initiator-tap", [str(LAB / "test-initiator.sh")], VM_TIMEOUT + 30,
                         env={"NET": "tap", "TIMEOUT": str(VM_TIMEOUT)})
    guest = guest_log(out)
    assert rc == 0 and "test-initiator (NET=tap): PASSED" in out, \
        f"rc={rc}\n--- guest:\n{tail(guest)}\n--- host:\n{tail(out)}"
    assert "initiator test PASSED" in guest
