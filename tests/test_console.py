"""The CLI's quiet console: workers' lines from our loggers reach the driver's log, library chatter does not."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from operators.worker_logs import MARK, MARK_ENV, OUR_LOGGERS, mark_worker_logs, parse_marked
from pipelines.ray_env import _forward_marked

ROOT = Path(__file__).resolve().parents[1]


def test_marked_lines_round_trip(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("operators.console_test")
    monkeypatch.setenv(MARK_ENV, "1")
    # mark_worker_logs() changes every one of our loggers: all of them are put back, else the rest of the
    # session logs through a handler on this test's (later closed) captured stderr.
    saved = {n: (list(lg.handlers), lg.level, lg.propagate) for n in OUR_LOGGERS for lg in [logging.getLogger(n)]}
    try:
        mark_worker_logs()
        mark_worker_logs()  # idempotent: one handler, one line per record
        logger.warning("two\nlines")
        err = capfd.readouterr().err.splitlines()
    finally:
        for name, (handlers, level, propagate) in saved.items():
            lg = logging.getLogger(name)
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
    assert err == [f"{MARK}WARNING operators.console_test: two", f"{MARK}WARNING operators.console_test: lines"]
    assert parse_marked("(RayTrainWorker pid=1) " + err[0]) == (logging.WARNING, "operators.console_test", "two")
    assert parse_marked("Checkpoint successfully created at: ...") is None


def test_forward_keeps_only_marked_lines(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        _forward_marked({"lines": ["Reporting training result 1: TrainingReport(...)",
                                   f"{MARK}INFO operators.training.common: train clip [#...] epoch 1/2",
                                   "Loading weights: 100%|##########| 46/46"]})
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("operators.training.common", logging.INFO, "train clip [#...] epoch 1/2")]


def test_quiet_cli_shows_worker_lines_of_ours_only(tmp_path: Path) -> None:
    """A real local Ray started as the CLI starts it: with and without -v."""
    script = textwrap.dedent("""
        import logging, sys
        import ray
        from pipelines.cli import _setup_logging
        from pipelines.config import RayConfig
        from pipelines.ray_env import ensure_ray

        _setup_logging(int(sys.argv[1]))
        ensure_ray(RayConfig(num_cpus=1))

        @ray.remote
        def work():
            import operators  # noqa: F401  (what every pipeline UDF imports)
            logging.getLogger().warning("library chatter from the root logger")
            print("a library's print", flush=True)
            logging.getLogger("operators.test").info("our progress line")
            return 1

        assert ray.get(work.remote()) == 1
        import time; time.sleep(2)  # the log monitor forwards worker lines asynchronously
        ray.shutdown()
    """)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop(MARK_ENV, None)
    out = {}
    for verbose in ("0", "1"):
        p = subprocess.run([sys.executable, "-c", script, verbose], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=180)
        assert p.returncode == 0, p.stderr[-3000:]
        out[verbose] = p.stdout + p.stderr
    quiet, loud = out["0"], out["1"]
    assert "INFO operators.test: our progress line" in quiet
    assert "library chatter" not in quiet and "a library's print" not in quiet
    assert "Started a local Ray instance" not in quiet
    assert MARK not in quiet
    assert "our progress line" in loud and "library chatter" in loud and "a library's print" in loud
