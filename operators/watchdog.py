"""Stall watchdog and fault-injection hooks for the Ray Data stages.

Operators call :func:`beat` each time they finish a block (read, decode, encode, search, score, write);
the beats go, fire-and-forget, to one small actor per job pinned to the driver's node. The driver wraps
each stage in :func:`watch`: a thread polls that actor and, when no block has completed for
``ray.stall_timeout_s``, interrupts the stage and raises :class:`StallError` naming the stage and the
last progress. The interruption is an asynchronous exception raised in the stage's own thread (main or
not), never a signal: a job started in the background of a non-interactive shell (``nohup cmd &``, cron
wrappers, some init systems) has SIGINT ignored, and an interrupt through SIGINT would then do nothing.
It catches what Ray Data cannot report itself: a hung model call, an actor pool that
waits forever for resources, or Ray issue 62746 (a size-1 pool with ``max_errored_blocks=-1``).

``MMR_FAULT_INJECT`` (tests only; unset in production) makes operators fail on purpose, ``;``-separated:

- ``rerank_query:<text>``: every scoring call that includes a query containing ``<text>`` raises.
- ``hang:<point>``: the operator sleeps forever at ``<point>`` (for the watchdog).
- ``slow:<point>:<seconds>``: the operator sleeps that long per batch (widens a window for a test).
- ``die:<point>:<marker file>``: the worker process exits at ``<point>`` once: the first process to get
  there creates the marker file and dies mid-batch; later calls (the restarted actor) run normally.

Points: ``embed_batch``, ``search_batch``, ``rerank_batch``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

_ENV = "MMR_FAULT_INJECT"
_NAME = "mmrerank-progress-{job}"


class StallError(RuntimeError):
    """A stage made no progress for longer than ``ray.stall_timeout_s``."""


class Terminated(BaseException):
    """SIGTERM arrived (a RayJob stopped, a pod evicted): unwind the stage like an error, publish nothing.

    A BaseException, so no ``except Exception`` on the way up swallows it; Ray Data shuts its executor
    (and the stage's actors) down on it, and Ray's atexit handler then stops a local Ray.
    """


# Set by the CLI's SIGTERM handler as it raises Terminated. Python drops an exception raised while the main
# thread runs a weakref callback or a __del__ ("Exception ignored in ..."): the job then checks this at each
# stage boundary and before publishing, so a lost signal still stops it there.
TERMINATE_REQUESTED = threading.Event()


def raise_if_terminated() -> None:
    """Raise :class:`Terminated` if a SIGTERM arrived whose exception may have been swallowed."""
    if TERMINATE_REQUESTED.is_set():
        raise Terminated(15)


# ------------------------------------------------------------------------------------------------
# fault injection (tests)
# ------------------------------------------------------------------------------------------------


def _fault_specs() -> list[list[str]]:
    return [s.split(":", 2) for s in os.environ.get(_ENV, "").split(";") if s]


def maybe_fail(point: str) -> None:
    """Apply ``hang:`` / ``die:`` faults registered for ``point`` (no-op when the variable is unset)."""
    for spec in _fault_specs():
        if spec[0] == "hang" and spec[1:2] == [point]:
            log.warning("fault injection: hanging at %s", point)
            while True:
                time.sleep(3600)
        if spec[0] == "slow" and spec[1:2] == [point] and len(spec) == 3:
            time.sleep(float(spec[2]))
        if spec[0] == "die" and spec[1:2] == [point] and len(spec) == 3:
            try:
                fd = os.open(spec[2], os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # only the first caller dies
            except FileExistsError:
                continue
            os.close(fd)
            log.warning("fault injection: worker %d exits at %s", os.getpid(), point)
            os._exit(1)


def maybe_fail_queries(queries: list[str]) -> None:
    """``rerank_query:<text>``: raise when a scoring call includes a query containing ``<text>``."""
    for spec in _fault_specs():
        if spec[0] == "rerank_query" and len(spec) > 1:
            text = ":".join(spec[1:])
            if any(text in q for q in queries):
                raise RuntimeError("injected reranker fault")


# ------------------------------------------------------------------------------------------------
# progress beats (workers) and the watchdog (driver)
# ------------------------------------------------------------------------------------------------


def _actor_name() -> str:
    import ray

    return _NAME.format(job=ray.get_runtime_context().get_job_id())


class _Progress:
    """Holds the time of the last completed block of the running stage (one per job, num_cpus=0)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t, self.n, self.what = time.monotonic(), 0, ""

    def beat(self, what: str, n: int) -> None:
        self.t, self.what = time.monotonic(), what
        self.n += n

    def state(self) -> tuple[float, int, str]:
        return time.monotonic() - self.t, self.n, self.what


_handle: Any = None
_missing_until = 0.0


def beat(what: str, n: int = 1) -> None:
    """Report a completed block to the job's watchdog; never raises, costs one async actor call."""
    global _handle, _missing_until
    if _handle is None:
        if time.monotonic() < _missing_until:
            return
        try:
            import ray

            if not ray.is_initialized():
                return
            _handle = ray.get_actor(_actor_name())
        except Exception:  # noqa: BLE001 - no watchdog in this job (serve, unit tests): look again later
            _missing_until = time.monotonic() + 30
            return
    try:
        _handle.beat.remote(what, n)
    except Exception:  # noqa: BLE001 - a lost beat only delays nothing; the next one retries the lookup
        _handle = None


_driver_actor: tuple[str, Any] | None = None  # (job id, handle): the driver keeps it alive for the job


def _progress_actor() -> Any:
    """The job's progress actor, created once per job. The driver holds its handle for the whole job:
    a non-detached actor dies with its last handle, and workers cache theirs across stages."""
    global _driver_actor
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Keyed by session and job: job ids restart at 01000000 in every new local Ray of this process.
    job = f"{ray.get_runtime_context().get_node_id()}/{ray.get_runtime_context().get_job_id()}"
    if _driver_actor is not None and _driver_actor[0] == job:
        return _driver_actor[1]
    # On the driver's node, so losing a worker node never takes the watchdog with it.
    strategy = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    cls = ray.remote(num_cpus=0, max_restarts=-1, scheduling_strategy=strategy)(_Progress)
    handle = cls.options(name=_actor_name(), get_if_exists=True, lifetime="non_detached").remote()
    _driver_actor = (job, handle)
    return handle


class _Stalled(BaseException):
    """Raised asynchronously in the stalled stage's thread (BaseException: not swallowed by ``except
    Exception`` on its way up; Ray Data's output iterator shuts its executor down on any BaseException)."""


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` in the thread at its next bytecode (``None`` cancels a pending one).

    Works in any thread whatever the process's signal dispositions; it reaches the stage because Ray Data's
    driver loop polls its output queue in Python.
    """
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exc) if exc is not None else None)


@contextlib.contextmanager
def watch(stage: str, stall_timeout_s: float | None) -> Iterator[None]:
    """Fail ``stage`` with :class:`StallError` when no block completes for ``stall_timeout_s`` seconds."""
    if not stall_timeout_s:
        yield
        return
    import ray

    global _driver_actor
    actor = _progress_actor()
    try:
        ray.get(actor.reset.remote())
    except Exception:  # noqa: BLE001 - a handle from an earlier Ray session of this process: start over
        _driver_actor = None
        actor = _progress_actor()
        ray.get(actor.reset.remote())
    stop = threading.Event()
    lock = threading.Lock()
    fired: dict[str, Any] = {}
    done = False
    target = threading.get_ident()

    def loop() -> None:
        while not stop.wait(min(5.0, stall_timeout_s / 4)):
            try:
                age, n, what = ray.get(actor.state.remote(), timeout=30)
            except Exception as e:  # noqa: BLE001 - the watchdog itself must not kill a healthy run
                log.warning("watchdog: cannot read progress (%s); retrying", type(e).__name__)
                continue
            if age > stall_timeout_s:
                with lock:
                    if done:
                        return
                    fired.update(age=age, n=n, what=what)
                    _set_async_exc(target, _Stalled)
                return

    t = threading.Thread(target=loop, name=f"watchdog-{stage}", daemon=True)
    t.start()
    try:
        try:
            yield
        finally:
            with lock:
                done = True
                if fired:  # the stage ended as the watchdog fired: the exception may not be delivered yet
                    _set_async_exc(target, None)
    except _Stalled:
        last = f"the last from {fired['what']}" if fired["what"] else "none at all"
        raise StallError(
            f"stage {stage!r} stalled: no block completed for {fired['age']:.0f}s (ray.stall_timeout_s="
            f"{stall_timeout_s:g}); {fired['n']} blocks had completed, {last}. A hung model call, a worker "
            "waiting for resources it cannot get, or a lost node; see the Ray logs") from None
    finally:
        stop.set()
