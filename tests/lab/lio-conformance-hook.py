"""Lab hook of test_lab_lio.py (runs on the host, inside the lab netns, while the guest waits):
libiscsi's iscsi-test-cu against the guest's LIO LUN and against the same kind of LUN on the
guest's built-in target, suite by suite, so the counts sit side by side.
Usage: lio-conformance-hook.py SPEC.json  (urls: {label: url}, suites, out, workdir)"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conformance import run_family  # noqa: E402

spec = json.loads(Path(sys.argv[1]).read_text())
out: dict[str, dict[str, dict[str, bool]]] = {label: {} for label in spec["urls"]}
for suite in spec["suites"]:
    for label, url in spec["urls"].items():
        t0 = time.monotonic()
        try:
            r = run_family(url, suite, Path(spec["workdir"]) / label / suite, timeout=spec.get("timeout", 300))
        except Exception as e:  # noqa: BLE001 - recorded as a suite that did not run
            print(f"{label} {suite}: did not run: {e!r}", flush=True)
            r = {}
        out[label][suite] = r
        print(f"{label:8} {suite:28} {sum(r.values())}/{len(r)} in {time.monotonic() - t0:.0f}s", flush=True)
        Path(spec["out"]).write_text(json.dumps(out))
