"""The stall watchdog and the fault-injection hooks (``operators/watchdog.py``).

Without Ray: the ``MMR_FAULT_INJECT`` grammar; ``die:`` exits a real process once and only once.
On a local Ray: beats sent from Ray Data tasks reach the job's progress actor; a stage whose tasks hang
fails with :class:`StallError` naming the stage, whether it runs on the main thread or on another thread
(an asynchronous exception in the stage's thread either way, never a signal); a stage that makes progress is
left alone. The whole-pipeline case (``hang:embed_batch`` on a multi-node cluster) is in test_cluster.py,
the CLI started with SIGINT ignored (``cmd &`` of a non-interactive shell) and SIGTERM in test_stop.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from operators import watchdog as W

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowing itself
def test_a_sigterm_swallowed_by_a_finalizer_still_stops_at_the_next_check() -> None:
    """Python drops an exception raised in ``__del__`` or a weakref callback ("Exception ignored in"): a
    SIGTERM arriving there must still stop the job at its next stage boundary (seen in test_stop once)."""
    import signal

    from pipelines.cli import _sigterm_stops_cleanly

    class Finalized:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGTERM)  # the handler runs here, inside the finalizer
            for _ in range(3):  # a few bytecodes: the handler's exception is raised (and dropped) in here
                pass

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(W.Terminated), _sigterm_stops_cleanly():
        obj = Finalized()
        del obj  # the Terminated of the handler is swallowed by the finalizer
        assert W.TERMINATE_REQUESTED.is_set()
        W.raise_if_terminated()  # what run() does at each stage boundary and before publishing
    assert signal.getsignal(signal.SIGTERM) is before and not W.TERMINATE_REQUESTED.is_set()
    W.raise_if_terminated()  # cleared once the command is over


# ----------------------------------------------------------------------------------------------
# fault injection (no Ray)
# ----------------------------------------------------------------------------------------------


def test_no_fault_variable_means_no_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMR_FAULT_INJECT", raising=False)
    W.maybe_fail("embed_batch")
    W.maybe_fail_queries(["anything"])


def test_rerank_query_fault_matches_only_its_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMR_FAULT_INJECT", "hang:search_batch;rerank_query:red: circle")
    W.maybe_fail_queries(["a blue square", "red circle"])  # the text includes the colon
    with pytest.raises(RuntimeError, match="injected reranker fault"):
        W.maybe_fail_queries(["a blue square", "big red: circle here"])
    W.maybe_fail("embed_batch")  # the hang is registered for another point


def test_die_exits_the_first_process_only(tmp_path: Path) -> None:
    marker = tmp_path / "died"
    env = {**os.environ, "MMR_FAULT_INJECT": f"die:rerank_batch:{marker}", "PYTHONPATH": str(ROOT)}
    code = "from operators.watchdog import maybe_fail; maybe_fail('embed_batch'); maybe_fail('rerank_batch'); " \
           "print('survived')"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 1 and "survived" not in first.stdout, first.stderr
    assert marker.exists()
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "survived" in second.stdout, second.stderr


def test_watch_disabled_is_a_plain_block() -> None:
    with W.watch("anything", None):
        pass


# ----------------------------------------------------------------------------------------------
# on a local Ray
# ----------------------------------------------------------------------------------------------


def _beating(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from operators.watchdog import beat

    beat("test-op", len(batch["id"]))
    return batch


def _hanging(release: str) -> Any:
    def fn(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        while not os.path.exists(release):  # hangs until the test lets it go (frees the CPU)
            time.sleep(0.2)
        return batch
    return fn


def test_beats_from_tasks_reach_the_progress_actor(ray_local: Any) -> None:
    import ray

    with W.watch("healthy", 600):  # a generous limit: this stage must not be stopped
        rows = ray.data.range(40, override_num_blocks=4).map_batches(_beating, batch_size=10).take_all()
    assert len(rows) == 40
    age, n, what = ray.get(ray.get_actor(W._actor_name()).state.remote())
    assert n == 40 and what == "test-op"


def test_a_hung_stage_fails_with_a_clear_error(ray_local: Any, tmp_path: Path) -> None:
    import ray

    release = str(tmp_path / "release")
    try:
        with pytest.raises(W.StallError) as ei, W.watch("hung stage", 2):
            ray.data.range(4, override_num_blocks=2).map_batches(_hanging(release), num_cpus=0.5).take_all()
    finally:
        Path(release).touch()
    msg = str(ei.value)
    assert "stage 'hung stage' stalled: no block completed for" in msg
    assert "ray.stall_timeout_s=2" in msg and "0 blocks had completed" in msg


def test_a_hung_stage_on_another_thread_fails_too(ray_local: Any, tmp_path: Path) -> None:
    import ray

    release = str(tmp_path / "release")
    out: dict[str, BaseException | list[Any]] = {}

    def stage() -> None:
        try:
            with W.watch("threaded stage", 2):
                out["rows"] = ray.data.range(4, override_num_blocks=2).map_batches(
                    _hanging(release), num_cpus=0.5).take_all()
        except BaseException as e:  # noqa: BLE001 - the assertion below names what arrived
            out["error"] = e

    t = threading.Thread(target=stage, name="stage")
    t.start()
    try:
        t.join(timeout=300)  # a hang guard, not a performance claim
    finally:
        Path(release).touch()
        t.join(timeout=120)
    assert isinstance(out.get("error"), W.StallError), out
    assert "stage 'threaded stage' stalled" in str(out["error"])


# ----------------------------------------------------------------------------------------------
# the CLI's exit on SIGTERM and Ctrl-C (main() in this process, the command replaced)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def cli_main(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Any:
    """``pipelines.cli.main`` with ``cmd_run`` replaced by the test's function; loggers' levels and the env it
    sets are restored after."""
    import logging

    import pipelines.cli as cli

    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # main() sets it when absent
    levels = {n: lg.level for n, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}

    def call(fn: Any, cfg_path: Path) -> tuple[int, list[str]]:
        monkeypatch.setattr(cli, "cmd_run", fn)
        with caplog.at_level(logging.INFO):
            rc = cli.main(["run", str(cfg_path)])
        return rc, [r.getMessage() for r in caplog.records if r.name == "mmrerank"]

    yield call
    for n, lg in logging.root.manager.loggerDict.items():
        if isinstance(lg, logging.Logger):
            lg.setLevel(levels.get(n, logging.NOTSET))


def test_sigterm_exits_143_and_a_second_sigterm_is_ignored(cli_main: Any, tmp_path: Path) -> None:
    import signal

    seen: dict[str, Any] = {}

    def run_cmd(args: Any) -> int:
        try:
            signal.raise_signal(signal.SIGTERM)  # the RayJob stopped: the handler raises Terminated here
        except W.Terminated:
            seen["handler_after_first"] = signal.getsignal(signal.SIGTERM)
            try:
                signal.raise_signal(signal.SIGTERM)  # a second one during the clean-up
            except W.Terminated:
                seen["second_raised"] = True
            raise
        return 0

    before = signal.getsignal(signal.SIGTERM)
    rc, lines = cli_main(run_cmd, tmp_path / "run.yaml")
    assert rc == 128 + signal.SIGTERM == 143
    assert seen == {"handler_after_first": signal.SIG_IGN}, seen  # ignored: the clean-up ran undisturbed
    assert [m for m in lines if m.startswith("stopped by")] == [
        "stopped by SIGTERM; nothing was published, the same command resumes the run"]
    assert signal.getsignal(signal.SIGTERM) is before and not W.TERMINATE_REQUESTED.is_set()


def test_ctrl_c_exits_130(cli_main: Any, tmp_path: Path) -> None:
    def run_cmd(args: Any) -> int:
        raise KeyboardInterrupt  # what Python makes of SIGINT on the main thread

    rc, lines = cli_main(run_cmd, tmp_path / "run.yaml")
    assert rc == 130
    assert [m for m in lines if m.startswith("stopped by")] == [
        "stopped by an interrupt; nothing was published, the same command resumes the run"]
