"""The local Ray start, without starting Ray: a start that runs out Ray's fixed registration wait is tried once
more (and only that failure), and what the failed start left behind is ended without touching other children."""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

import pytest

from pipelines import ray_env

TIMEOUT = Exception("The current node timed out during startup. This could happen because some of the raylet "
                    "failed to startup or the GCS has become overloaded.")


@pytest.fixture
def no_cleanup(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    monkeypatch.setattr(ray_env, "_stop_partial_start", lambda: calls.append(1))
    return calls


def _fake_init(monkeypatch: pytest.MonkeyPatch, outcomes: list[BaseException | None]) -> list[dict[str, Any]]:
    import ray

    seen: list[dict[str, Any]] = []

    def init(**kw: Any) -> None:
        seen.append(kw)
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    return seen


def test_a_start_that_times_out_is_tried_again(monkeypatch: pytest.MonkeyPatch, no_cleanup: list[int],
                                               caplog: pytest.LogCaptureFixture) -> None:
    seen = _fake_init(monkeypatch, [TIMEOUT, None])
    with caplog.at_level(logging.WARNING, logger="pipelines.ray_env"):
        ray_env._init_local({"num_cpus": 2})
    assert [kw["address"] for kw in seen] == ["local", "local"] and seen[1]["num_cpus"] == 2
    assert no_cleanup == [1]
    assert "starting it again (attempt 2 of 2)" in caplog.text


def test_other_failures_and_a_second_timeout_are_raised(monkeypatch: pytest.MonkeyPatch,
                                                        no_cleanup: list[int]) -> None:
    _fake_init(monkeypatch, [ValueError("bad resources")])
    with pytest.raises(ValueError, match="bad resources"):
        ray_env._init_local({})
    assert no_cleanup == []  # not a start timeout: no retry
    seen = _fake_init(monkeypatch, [TIMEOUT] * ray_env.LOCAL_START_ATTEMPTS)
    with pytest.raises(Exception, match="timed out during startup"):
        ray_env._init_local({})
    assert len(seen) == ray_env.LOCAL_START_ATTEMPTS


CLEANUP = """
import os, subprocess, sys
import ray
from pipelines import ray_env
sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
stand_in = subprocess.Popen([*sleep, os.path.join(os.path.dirname(ray.__file__), "core", "raylet")])
other = subprocess.Popen(sleep)
ray_env._stop_partial_start()
print(stand_in.wait(timeout=10) != 0, other.poll() is None)
other.kill()
"""


def test_cleanup_ends_only_ray_processes() -> None:
    """A child started from the ray package (here a stand-in naming a file there) is ended; a plain child
    (a sleep) survives. In a process of its own: here it would end this test process's own Ray too."""
    r = subprocess.run([sys.executable, "-c", CLEANUP], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "True"], (r.stdout, r.stderr[-2000:])
