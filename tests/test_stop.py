"""How ``mmrerank run`` stops, whatever started it: the stall watchdog and SIGTERM, on the CLI as a subprocess.

* A hung stage (``MMR_FAULT_INJECT=hang:embed_batch``) fails the run with the stall error (exit 3) within
  ``ray.stall_timeout_s`` plus a margin, nothing published, both when the job runs in the background of a
  non-interactive shell (``cmd &``: SIGINT ignored, as under nohup, cron wrappers and some init systems) and
  when started normally.
* SIGTERM mid-rerank (a RayJob stopped, a pod evicted): the driver stops cleanly (exit 143, its local Ray
  processes gone, LATEST untouched), and the same command then resumes the run and publishes results equal
  to the brute-force reference.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from operators.storage import Storage
from pipelines import publish as P
from pipelines.config import parse_config
from pipelines.sample import SampleInfo, make_sample
from tests.helpers import any_file, cli_cmd, cli_env, kill_tree, log_tail, wait_until, write_yaml
from tests.reference import build_reference, check_against_reference, check_manifest, lean, run_cfg_dict

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

STALL_S = 5.0
# Ray's start, the model load and the shutdown on a loaded 2-core machine: a hang guard, not a speed claim.
MARGIN_S = 300.0


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleInfo:
    return make_sample(str(tmp_path_factory.mktemp("stop-sample") / "s"), docs=30, queries=5, shards=3, seed=11,
                       bad_rows=True, image_size=40)


def _sigint_ignored(pid: int) -> bool:
    """Whether the process ignores SIGINT (the SigIgn mask of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    raise AssertionError(f"no SigIgn line for pid {pid}")


def _start(cfg_path: str, log_path: Path, cwd: Path, fault: str | None,
           background: bool = False) -> subprocess.Popen[bytes]:
    """``mmrerank run`` in its own session; ``background``: as `cmd &` of a non-interactive bash."""
    env = cli_env()
    env.pop("MMR_FAULT_INJECT", None)
    if fault:
        env["MMR_FAULT_INJECT"] = fault
    cmd = cli_cmd("run", cfg_path)
    if background:
        cmd = ["bash", "-c", '"$@" & wait $!', "bash", *cmd]
    with open(log_path, "wb") as log:
        # Started normally, SIGINT has its default action, however this test process was started (`nohup ... &`
        # leaves it ignored here, and a child would inherit that).
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _driver_pid(proc: subprocess.Popen[bytes], background: bool) -> int:
    if not background:
        return proc.pid
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        kids = [p for p in psutil.Process(proc.pid).children() if "pipelines.cli" in " ".join(p.cmdline())]
        if kids:
            return kids[0].pid
        time.sleep(0.05)
    raise AssertionError("the background mmrerank process never started")


def _session_left(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(p.pid) == sid:
                out.append(p)
    return out


def _wait_session_gone(sid: int, within_s: float = 60.0) -> list[psutil.Process]:
    """The driver's session once it exited: Ray's atexit shutdown stops its local processes."""
    deadline = time.monotonic() + within_s
    while (left := _session_left(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _no_run_published(root: Path) -> None:
    assert not (root / P.LATEST).exists(), (root / P.LATEST).read_text()
    assert not list(root.glob(f"runs/*/{P.MANIFEST}"))


@pytest.mark.parametrize("background", [True, False], ids=["background-sigint-ignored", "foreground"])
def test_a_hung_stage_fails_the_run_however_it_was_started(background: bool, sample: SampleInfo, tmp_path: Path,
                                                           no_ray_in_this_process: None) -> None:
    root = tmp_path / "root"
    d = lean(run_cfg_dict(str(root), sample.corpus, sample.queries))
    d["ray"]["stall_timeout_s"] = STALL_S
    log_path = tmp_path / "run.log"
    proc = _start(write_yaml(tmp_path / "run.yaml", d), log_path, tmp_path, "hang:embed_batch", background)
    try:
        driver = _driver_pid(proc, background)
        assert _sigint_ignored(driver) is background, "the test did not set up the launch it names"
        try:
            rc = proc.wait(timeout=STALL_S + MARGIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the hung run did not stop within {STALL_S + MARGIN_S:.0f}s; log tail:\n"
                        f"{log_tail(log_path)}")
    finally:
        kill_tree(proc)
    log = log_path.read_text(errors="replace")
    assert rc == 3, log_tail(log_path)
    assert "stage 'embed corpus' stalled: no block completed for" in log, log_tail(log_path)
    assert f"ray.stall_timeout_s={STALL_S:g}" in log
    _no_run_published(root)


def test_sigterm_mid_stage_stops_cleanly_then_the_run_resumes(sample: SampleInfo, tmp_path: Path,
                                                              no_ray_in_this_process: None) -> None:
    root = tmp_path / "root"
    d = lean(run_cfg_dict(str(root), sample.corpus, sample.queries))
    cfg_path = write_yaml(tmp_path / "run.yaml", d)
    log_path = tmp_path / "terminated.log"
    # Slow scoring calls keep the rerank stage running while the signal arrives: a call is now a block of whole
    # candidate docs (several model batches), so a small run makes only a few calls and 2 s each was too short.
    proc = _start(cfg_path, log_path, tmp_path, "slow:rerank_batch:10")
    try:
        wait_until(proc, lambda: any_file(root, "runs/*/_STAGES/search.json")() and any_file(root, "runs/*/_pairs/*")(),
                    "the rerank stage", log_path)
        os.kill(proc.pid, signal.SIGTERM)  # the driver only, as Kubernetes and `ray job stop` do
        try:
            rc = proc.wait(timeout=MARGIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"SIGTERM did not stop the run within {MARGIN_S:.0f}s; log tail:\n{log_tail(log_path)}")
        left = _wait_session_gone(proc.pid)
    finally:
        kill_tree(proc)
    assert rc == 128 + signal.SIGTERM, log_tail(log_path)
    log = log_path.read_text(errors="replace")
    assert "stopped by SIGTERM; nothing was published" in log, log_tail(log_path)
    assert "Traceback" not in log, log_tail(log_path)
    assert not left, f"processes of the stopped job still running: {left}"
    _no_run_published(root)
    (run_dir,) = (root / "runs").iterdir()
    assert (run_dir / "_STAGES" / "search.json").exists() and not (run_dir / "_STAGES" / "rerank.json").exists()

    log_path = tmp_path / "resumed.log"
    proc = _start(cfg_path, log_path, tmp_path, None)
    try:
        rc = proc.wait(timeout=1200)
    finally:
        kill_tree(proc)
    assert rc == 0, log_tail(log_path)
    assert f"resuming run {run_dir.name}" in log_path.read_text(errors="replace")
    storage = Storage()
    assert P.read_latest(storage, str(root))[0]["run_id"] == run_dir.name
    check_manifest(storage, str(run_dir), run_dir.name)
    cfg = parse_config(d)
    check_against_reference(storage, cfg, str(run_dir), run_dir.name, build_reference(cfg))
