"""pytest plugin of the GPU check (bench/gpu_check.py loads it with ``-p gpu_check_pytest``).

Appends one JSON line per test to the file named by $GPU_CHECK_TESTS as each test finishes, so a
pytest process killed at its time cap (or by a CUDA fault) still leaves the outcomes so far, and a
"start" line before each test, so the test that was running when the process died is known. The
first failure's traceback is written in full (pytest's --tb=long text); later ones are cut to
their last lines.
"""

from __future__ import annotations

import json
import os

_state = {"failures": 0}


def _write(rec: dict) -> None:
    path = os.environ.get("GPU_CHECK_TESTS")
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()


def pytest_runtest_logstart(nodeid, location):
    _write({"event": "start", "nodeid": nodeid})


def pytest_runtest_logreport(report):
    # one record per test: the call phase, or the setup / teardown phase when it did not pass
    # (a skip is reported in setup; a fixture error in setup or teardown)
    if report.when != "call" and report.passed:
        return
    outcome = report.outcome
    if report.failed and report.when != "call":
        outcome = "error"
    rec = {"event": "result", "nodeid": report.nodeid, "when": report.when, "outcome": outcome,
           "seconds": round(report.duration, 3)}
    if report.skipped and isinstance(report.longrepr, tuple):
        rec["reason"] = str(report.longrepr[2])[:300]
    if report.failed:
        text = report.longreprtext
        _state["failures"] += 1
        rec["traceback"] = text if _state["failures"] == 1 else "\n".join(text.splitlines()[-25:])
    _write(rec)
