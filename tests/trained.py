"""What the test session builds once and later test runs reuse: the trained tiny models, and (through
:func:`cached`) anything else a session fixture builds from the code alone (the random-weight quickstart).

The trained models: the binding sample, the tiny retriever trained on its training queries with the shipped
``train-clip.yaml``, a retrieval-only run with it (the reranker's hard negatives), the tiny yes/no reranker trained
on that run's candidates with the shipped ``train-vlm.yaml``, and a published nightly run with both.

Training them takes minutes on 2 cores, so each build goes into ``<cache>/<name>-<key>`` and is reused by later
test runs on the same checkout (and by a parallel test worker). ``key`` hashes the sample settings, the shipped
configs, every source file of ``operators/`` and ``pipelines/`` and the versions of the numeric libraries: any
change to what could change the result builds it again (a clean clone, as in CI, always does). ``MMR_TEST_CACHE``
moves the cache (default ``<repo>/.cache/tests``); a build holds a file lock and writes its state file last, so a
killed build or a concurrent test run never leaves a half-built directory in use. Tests treat the builds as
read-only and write under their own roots.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
STATE = "state.pkl"

# The binding sample and the training settings of the session's trained models: the quickstart's training
# configs as shipped, on a quarter of its sample (the quality tests need a trained ranking, not the best one).
TRAINED_SAMPLE: dict[str, Any] = {"docs": 160, "queries": 40, "shards": 2, "binding": True}
TRAINED_TRAIN: dict[str, Any] = {}  # over both shipped training configs' train sections
_VERSIONED = ("torch", "numpy", "open_clip_torch", "transformers", "ray", "pyarrow", "faiss-cpu", "pillow")


@dataclass
class TrainedModels:
    """The binding sample, the tiny retriever trained on its training queries, a retrieval-only run with it
    (the reranker's hard negatives), the tiny yes/no reranker trained on that run's candidates, and a
    published nightly run with both (``root``'s LATEST). Read-only for tests: they write under their own roots."""

    out: Path
    sample: Any  # SampleInfo
    clip: Any  # TrainReport
    run_a: Any  # RunReport: trained retriever, retrieval only (not published)
    vlm: Any  # TrainReport
    run_b: Any  # RunReport: trained retriever + trained reranker, published
    key: str  # trained_key()

    @property
    def root(self) -> str:
        return str(self.out / "out")

    @property
    def retriever(self) -> dict[str, Any]:
        return {"name": "mmr-tiny", "pretrained": self.clip.weights}

    @property
    def reranker(self) -> dict[str, Any]:
        return {"backend": "vlm_yesno", "model": self.vlm.output, "batch_size": 16}

    @property
    def heldout_qrels(self) -> str:
        from pipelines.train import HELDOUT_QRELS

        return str(Path(self.vlm.output) / HELDOUT_QRELS)

    def config(self, path: Path, root: str | None = None, **sections: Any) -> Any:
        """The shipped config at ``path`` on this sample and root (or ``root``), ``sections`` merged over its
        own."""
        import yaml

        from pipelines.config import parse_config
        from pipelines.quickstart import _paths

        data = yaml.safe_load(path.read_text())
        data.update(_paths(str(self.out)))
        if root is not None:
            data["root"] = root
        data["ray"] = {"progress_bars": False}
        for name, value in sections.items():
            data[name] = {**data.get(name, {}), **value}
        return parse_config(data, str(path))


def _source_files() -> list[Path]:
    files = [p for d in ("operators", "pipelines") for p in (REPO / d).rglob("*")
             if p.is_file() and p.suffix in (".py", ".yaml", ".json") and "__pycache__" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(REPO).as_posix())


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def trained_key() -> str:
    """Everything the trained models depend on: sample settings, the code and configs that build them (the
    shipped configs live under pipelines/), and the numeric libraries' versions."""
    h = hashlib.sha256()
    h.update(json.dumps([TRAINED_SAMPLE, TRAINED_TRAIN, {d: _version(d) for d in _VERSIONED}],
                        sort_keys=True).encode())
    for p in _source_files():
        h.update(p.relative_to(REPO).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("MMR_TEST_CACHE") or REPO / ".cache" / "tests")


def train_models(out: Path, key: str) -> TrainedModels:
    """Build the trained models into ``out`` (on the current Ray): the quickstart's recipe
    (:func:`pipelines.quickstart.fine_tune`, from the shipped bases) on the session's sample."""
    from pipelines.quickstart import DEFAULT_CONFIG, fine_tune
    from pipelines.run import run

    ft = fine_tune(str(out), docs=TRAINED_SAMPLE["docs"], queries=TRAINED_SAMPLE["queries"],
                   shards=TRAINED_SAMPLE["shards"], bad_rows=False, log_steps=False, train=TRAINED_TRAIN)
    t = TrainedModels(out, ft.sample, ft.clip, ft.candidates, ft.vlm, None, key)
    t.run_b = run(t.config(DEFAULT_CONFIG, embed={"model": t.retriever}, rerank=t.reranker))
    return t


@contextlib.contextmanager
def _locked(path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached(name: str, build: Callable[[Path], T]) -> T:
    """``build(out)``'s result for the current key, from ``<cache>/<name>-<key>`` when an earlier test run (or a
    parallel test worker) built it, else built now and kept. One builder at a time (a file lock); the state file
    is written last, so a build that was killed is built again."""
    key = trained_key()
    out = cache_dir() / f"{name}-{key}"
    with _locked(out.with_name(out.name + ".lock")):
        state = out / STATE
        if state.is_file():
            log.info("%s reused from %s", name, out)
            return pickle.loads(state.read_bytes())
        shutil.rmtree(out, ignore_errors=True)  # a build that did not finish
        out.mkdir(parents=True)
        t = build(out)
        tmp = state.with_name(STATE + ".tmp")
        tmp.write_bytes(pickle.dumps(t))
        os.replace(tmp, state)
        for old in out.parent.glob(f"{name}-*"):  # earlier keys' builds: stale once the code moved on
            if old.is_dir() and old != out:
                shutil.rmtree(old, ignore_errors=True)
        return t
