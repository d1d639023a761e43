"""The nightly run (``pipelines.run``) end to end.

* Fidelity: a run on local Ray (local root and s3://) equals a brute-force reference computed without Ray
  from the same checkpoints: open_clip embeddings, exact ``IndexFlatIP`` top-k, the rerank backend called
  in-process on the same pairs, then the same fusion + selection.
* Publish: the manifest lists every file of the run (size, sha256, rows); ``LATEST`` names the run; a
  reader polling ``LATEST`` never sees a run that does not verify; racing publishers; refused stale CAS.
* Resume: ``mmrerank run`` as a subprocess, SIGKILLed (with its Ray processes) while embedding, after
  search, while rerank writes; the same command picks the run up; no duplicate/orphan files.
* Incremental: one changed and one added corpus shard are the only ones re-embedded.
* Fails fast: bad config, missing input, missing bucket, dead endpoint: exit 2, one line, no secrets.

The CLI subprocess tests shut this process's Ray down first (``no_ray_in_this_process``: the child gets the 2
cores); the in-process tests run on the session's shared Ray, started again if a CLI test stopped it, so no test
depends on the order. The reference and the run checks are in ``tests/reference.py``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.storage import Storage, join, scheme_of, strip_scheme
from pipelines import publish as P
from pipelines import run as run_mod
from pipelines.config import Config, parse_config
from pipelines.run import STAGES, RunReport, run
from pipelines.sample import SampleInfo, make_sample
from tests.helpers import (
    CLI_DEADLINE_S,
    TEST_ACCESS_KEY_ID,
    TEST_SECRET_ACCESS_KEY,
    S3Server,
    any_file,
    cli_cmd,
    cli_env,
    closed_port,
    kill_tree,
    log_tail,
    read_rows,
    spawn,
    wait_until,
    write_yaml,
)
from tests.reference import (
    TOP_N,
    K,
    Reference,
    build_reference,
    check_against_reference,
    check_manifest,
    lean,
    run_cfg_dict,
)

# Config-borne credentials for the fail-fast cases: must never show up in any output either.
CFG_ACCESS_KEY_ID = "cfg-key-id-MMR-7781"
CFG_SECRET_ACCESS_KEY = "cfg-secret-MMR-c0ffee42"
SECRETS = (TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, CFG_ACCESS_KEY_ID, CFG_SECRET_ACCESS_KEY)


def _cfg(root: str, corpus: str, queries: str) -> Config:
    return parse_config(run_cfg_dict(root, corpus, queries))


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleInfo:
    return make_sample(str(tmp_path_factory.mktemp("run-sample") / "s"), docs=30, queries=5, shards=3, seed=11,
                       bad_rows=True, image_size=40)


@pytest.fixture(scope="module")
def reference(sample: SampleInfo) -> Reference:
    ref = build_reference(_cfg("/unused", sample.corpus, sample.queries))
    # The reference finds exactly the documented bad rows (the sample's own bookkeeping).
    assert ref.rejects == {(b["shard"].rsplit("/", 1)[-1], b["row_index"], b["error_type"])
                           for b in sample.expected_rejects}
    assert len(ref.doc_ids) == sample.docs + len(sample.expected_accepts)
    return ref


# ----------------------------------------------------------------------------------------------
# checks on a finished run
# ----------------------------------------------------------------------------------------------


def check_stats(storage: Storage, run_dir: str, run_id: str, ref: Reference, corpus_rows: int) -> dict[str, Any]:
    stats = storage.read_json(join(run_dir, "stats.json"))
    assert stats["run_id"] == run_id
    assert set(stats["stages"]) == set(STAGES)
    for name, s in stats["stages"].items():
        assert s["rows_in"] == s["rows_ok"] + s["rows_rejected"], (name, s)
    st = stats["stages"]
    nq, k = len(ref.query_ids), min(K, len(ref.doc_ids))
    assert (st["embed_corpus"]["rows_in"], st["embed_corpus"]["rows_ok"], st["embed_corpus"]["rows_rejected"]) == \
        (corpus_rows, len(ref.doc_ids), len(ref.rejects))
    assert st["index"]["rows_ok"] == len(ref.doc_ids)
    assert (st["embed_queries"]["rows_in"], st["embed_queries"]["rows_rejected"]) == (nq, 0)
    assert (st["search"]["rows_in"], st["search"]["rows_ok"], st["search"]["candidates"]) == (nq, nq, nq * k)
    assert (st["rerank"]["rows_in"], st["rerank"]["rows_ok"], st["rerank"]["results"]) == (nq * k, nq * k, nq * TOP_N)
    assert st["rejects"]["rows_in"] == len(ref.rejects)
    return stats


def check_rejects(storage: Storage, run_dir: str, ref: Reference) -> None:
    rows = read_rows(storage, join(run_dir, "rejects"), "embed_corpus-*.parquet")
    assert {(r["source"].rsplit("/", 1)[-1], r["row_index"], r["error_type"]) for r in rows} == ref.rejects
    assert len(rows) == len(ref.rejects)
    assert all(r["stage"] == "embed_corpus" and r["error_message"] for r in rows)
    assert not read_rows(storage, join(run_dir, "rejects"), "embed_queries-*.parquet")


def check_cache_has_no_orphans(storage: Storage, root: str) -> None:
    """Every embedding shard directory is complete (``_SUCCESS.json``) and holds exactly what it lists."""
    fs = storage.fs(root)
    base = strip_scheme(join(root, "embeddings"))
    by_dir: dict[str, set[str]] = {}
    for f in fs.find(base):
        rel = f[len(base) + 1:].split("/")
        if len(rel) == 4 and rel[2] != "sets":  # <model>/<kind>/<shard key>/<file>
            by_dir.setdefault("/".join(rel[:3]), set()).add(rel[3])
    assert by_dir
    for d, files in by_dir.items():
        assert "_SUCCESS.json" in files, f"{d}: incomplete cache entry {sorted(files)}"
        m = json.loads(fs.cat(f"{base}/{d}/_SUCCESS.json"))
        assert files == {"_SUCCESS.json", *m["parts"], *m["rejects"]}, d


class LatestWatcher:
    """A reader thread: polls ``LATEST`` and verifies every run it names (a reader must never see a
    partial run). ``errors`` collects anything that did not check out."""

    def __init__(self, root: str, interval: float = 0.1) -> None:
        self.root, self.interval = root, interval
        self.seen: list[str] = []
        self.errors: list[str] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="latest-watcher", daemon=True)

    def _poll(self, storage: Storage) -> None:
        self.polls += 1
        try:
            current, _ = P.read_latest(storage, self.root)
            if current is None:
                return
            run_id = current["run_id"]
            run_dir = join(self.root, "runs", run_id)
            first = not self.seen or self.seen[-1] != run_id
            P.verify_run(storage, run_dir, deep=first)  # full sha256 check once per run observed
            if first:
                self.seen.append(run_id)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append(f"{type(e).__name__}: {e}")

    def _loop(self) -> None:
        storage = Storage()
        while not self._stop.is_set():
            self._poll(storage)
            self._stop.wait(self.interval)
        self._poll(storage)  # and once after the run returned

    def __enter__(self) -> LatestWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "LATEST watcher did not stop"


# ----------------------------------------------------------------------------------------------
# the CLI as a subprocess
# ----------------------------------------------------------------------------------------------


def _no_secrets(text: str) -> None:
    for s in SECRETS:
        assert s not in text, f"secret {s[:6]}... in the output"


def _fail_fast(cfg_path: str, cwd: Path) -> tuple[int, str]:
    p = subprocess.run(cli_cmd("run", cfg_path), capture_output=True, text=True, env=cli_env(), cwd=cwd,
                       timeout=CLI_DEADLINE_S)
    out = p.stdout + p.stderr
    _no_secrets(out)
    assert "Traceback" not in out, out
    return p.returncode, out


def test_cli_fails_fast_on_bad_config_and_missing_input(sample: SampleInfo, tmp_path: Path,
                                                         no_ray_in_this_process: None) -> None:
    root = tmp_path / "root"
    bad = run_cfg_dict(str(root), sample.corpus, sample.queries)
    bad["embed"]["batch_sizee"] = 3
    bad["storage"] = {"access_key_id": CFG_ACCESS_KEY_ID, "secret_access_key": CFG_SECRET_ACCESS_KEY}
    rc, out = _fail_fast(write_yaml(tmp_path / "unknown-key.yaml", bad), tmp_path)
    assert rc == 2, out
    assert "embed.batch_sizee" in out and "unknown field" in out, out

    missing = run_cfg_dict(str(root), str(tmp_path / "no-such-corpus"), sample.queries)
    rc, out = _fail_fast(write_yaml(tmp_path / "missing.yaml", missing), tmp_path)
    assert rc == 2, out
    assert str(tmp_path / "no-such-corpus") in out and "does not exist" in out, out
    assert not root.exists(), "a failed preflight must not create anything under root"


def test_cli_fails_fast_on_unreachable_storage(sample: SampleInfo, tmp_path: Path, s3_server: S3Server,
                                               no_ray_in_this_process: None) -> None:
    client = s3_server.client()
    missing_bucket = f"mmr-missing-{uuid.uuid4().hex[:12]}"
    cfg = run_cfg_dict(f"s3://{missing_bucket}/root", sample.corpus, sample.queries)
    rc, out = _fail_fast(write_yaml(tmp_path / "no-bucket.yaml", cfg), tmp_path)
    assert rc == 2, out
    assert f"s3://{missing_bucket}/root" in out and "bucket does not exist" in out, out
    assert missing_bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}

    # A dead endpoint (nothing listens on the port), credentials given in the config.
    bucket = f"mmr-test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    with closed_port() as port:
        cfg = run_cfg_dict(f"s3://{bucket}/root", sample.corpus, sample.queries)
        cfg["storage"] = {"endpoint_url": f"http://127.0.0.1:{port}", "access_key_id": CFG_ACCESS_KEY_ID,
                          "secret_access_key": CFG_SECRET_ACCESS_KEY, "region": "us-east-1",
                          "retry_deadline_s": 1}  # a dead endpoint: fail after the attempts, not a minute
        rc, out = _fail_fast(write_yaml(tmp_path / "dead-endpoint.yaml", cfg), tmp_path)
    assert rc == 2, out
    assert f"s3://{bucket}/root" in out and f"127.0.0.1:{port}" in out, out
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    client.delete_bucket(Bucket=bucket)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_cli_resumes_after_sigkill_at_three_points(sample: SampleInfo, tmp_path: Path,
                                                   no_ray_in_this_process: None) -> None:
    root = tmp_path / "root"
    # Lean (one actor per pool, the retriever's model reranks): five CLI processes, each starting its pools; what
    # is checked here is the resume at each kill point, against this config's own reference.
    cfg_dict = lean(run_cfg_dict(str(root), sample.corpus, sample.queries))
    cfg_path = write_yaml(tmp_path / "run.yaml", cfg_dict)
    runs = root / "runs"
    kills = [
        ("while embedding the corpus", any_file(root, "embeddings/*/corpus/*/part-*.parquet")),
        # after search finished: as soon as rerank has regrouped candidates (leaves _pairs/ behind)
        ("after search.json, in rerank", lambda: any_file(root, "runs/*/_STAGES/search.json")()
         and any_file(root, "runs/*/_pairs/*/*.parquet")()),
        ("while rerank writes scored pairs", any_file(root, "runs/*/scored/*/*.parquet")),
    ]
    run_id = None
    with LatestWatcher(str(root)) as watcher:
        for i, (what, cond) in enumerate(kills):
            log_path = tmp_path / f"attempt-{i}.log"
            proc = spawn(["run", cfg_path], log_path, tmp_path)
            try:
                wait_until(proc, cond, what, log_path)
            finally:
                kill_tree(proc)
            ids = sorted(p.name for p in runs.iterdir())
            assert len(ids) == 1, f"a restart created a second run instead of resuming: {ids}"
            assert run_id in (None, ids[0])
            run_id = ids[0]
            if i:
                assert f"resuming run {run_id}" in log_path.read_text(errors="replace")
            assert not (runs / run_id / P.MANIFEST).exists(), f"killed {what}, yet the run completed"
            latest = root / P.LATEST
            assert not latest.exists(), f"LATEST written for an incomplete run: {latest.read_text()}"
        assert (runs / run_id / "_pairs").exists() or (runs / run_id / "scored").exists()

        log_path = tmp_path / "final.log"
        proc = spawn(["run", cfg_path, "--resume", run_id], log_path, tmp_path)
        try:
            rc = proc.wait(timeout=CLI_DEADLINE_S)
        finally:
            kill_tree(proc)  # its Ray processes, should any outlive it
        log = log_path.read_text(errors="replace")
        assert rc == 0, log_tail(log_path)
        assert f"resuming run {run_id}" in log
    assert not watcher.errors, watcher.errors
    assert watcher.seen == [run_id]

    storage = Storage()
    cfg = parse_config(cfg_dict)
    reference = build_reference(cfg)
    run_dir = str(runs / run_id)
    assert sorted(p.name for p in runs.iterdir()) == [run_id]
    assert P.read_latest(storage, str(root))[0]["run_id"] == run_id
    check_manifest(storage, run_dir, run_id)
    assert not (runs / run_id / "_pairs").exists()
    stats = check_stats(storage, run_dir, run_id, reference, sample.rows)
    assert stats["resumed"] is True
    check_rejects(storage, run_dir, reference)
    check_against_reference(storage, cfg, run_dir, run_id, reference)
    check_cache_has_no_orphans(storage, str(root))
    # Scored pairs: each (query, candidate) exactly once, whatever the kills left behind.
    scored = read_rows(storage, join(run_dir, "scored"))
    assert len(scored) == len({(r["query_id"], r["doc_id"]) for r in scored}) == len(reference.query_ids) * K

    # A finished run cannot be resumed again: exit 2, nothing touched.
    before = check_manifest(storage, run_dir, run_id)
    p = subprocess.run(cli_cmd("run", cfg_path, "--resume", run_id), capture_output=True, text=True,
                       env=cli_env(), cwd=tmp_path, timeout=CLI_DEADLINE_S)
    assert p.returncode == 2 and "already complete" in p.stderr, p.stderr[-3000:]
    assert check_manifest(storage, run_dir, run_id) == before


# ----------------------------------------------------------------------------------------------
# in-process runs on the module's local Ray
# ----------------------------------------------------------------------------------------------


@dataclass
class Done:
    cfg: Config
    root: str
    report: RunReport
    watcher: LatestWatcher
    latest: dict[str, Any] | None


def _run_watched(cfg: Config) -> Done:
    with LatestWatcher(cfg.root) as watcher:
        report = run(cfg)
    latest, _ = P.read_latest(Storage(), cfg.root)
    return Done(cfg, cfg.root, report, watcher, latest)


@pytest.fixture(scope="module")
def clean_local(sample: SampleInfo, tmp_path_factory: pytest.TempPathFactory, ray_local: Any) -> Done:
    """One clean run on a local root, shared by the end-to-end and incremental tests."""
    root = str(tmp_path_factory.mktemp("clean") / "root")
    return _run_watched(_cfg(root, sample.corpus, sample.queries))


def _check_run(done: Done, ref: Reference, corpus_rows: int) -> None:
    storage = Storage()
    rep = done.report
    assert rep.published and not rep.resumed
    assert rep.run_dir == join(done.root, "runs", rep.run_id)
    assert done.latest is not None and done.latest["run_id"] == rep.run_id
    assert done.latest["manifest"] == f"runs/{rep.run_id}/{P.MANIFEST}"
    check_manifest(storage, rep.run_dir, rep.run_id)
    stats = check_stats(storage, rep.run_dir, rep.run_id, ref, corpus_rows)
    assert stats["resumed"] is False
    check_rejects(storage, rep.run_dir, ref)
    check_against_reference(storage, done.cfg, rep.run_dir, rep.run_id, ref)
    # The reader polled throughout and only ever saw runs that verify; it saw this one published.
    assert not done.watcher.errors, done.watcher.errors
    assert done.watcher.seen and done.watcher.seen[-1] == rep.run_id


@pytest.mark.slow
def test_run_local_matches_reference(clean_local: Done, reference: Reference, sample: SampleInfo) -> None:
    _check_run(clean_local, reference, sample.rows)
    assert clean_local.latest is not None and clean_local.latest["previous"] is None
    assert clean_local.watcher.seen == [clean_local.report.run_id]
    stats = Storage().read_json(join(clean_local.report.run_dir, "stats.json"))
    assert stats["stages"]["embed_corpus"]["shards_reused"] == 0
    assert stats["stages"]["embed_corpus"]["rows_embedded"] == sample.rows


@pytest.mark.slow
def test_run_s3_matches_reference(s3_bucket: str, sample: SampleInfo, ray_local: Any) -> None:
    # Same arguments as the local sample: byte-identical inputs, so the local sample's reference applies. Lean (the
    # retriever's model reranks, one actor per pool): distinct reranker scores and their fusion are checked on the
    # local root; here it is the storage.
    s3_sample = make_sample(f"{s3_bucket}/sample", docs=30, queries=5, shards=3, seed=11, bad_rows=True,
                            image_size=40)
    lean_dict = lean(run_cfg_dict("/unused", sample.corpus, sample.queries))
    reference = build_reference(parse_config(lean_dict))
    cfg = parse_config({**lean_dict, "root": f"{s3_bucket}/root", "corpus": s3_sample.corpus,
                        "queries": s3_sample.queries})
    done = _run_watched(cfg)
    assert done.report.run_dir.startswith("s3://")
    _check_run(done, reference, s3_sample.rows)
    assert P.latest_run(Storage(), done.root)[0] == done.report.run_dir


@pytest.mark.slow
def test_incremental_run_reembeds_only_changed_and_added_shards(clean_local: Done, sample: SampleInfo,
                                                                tmp_path: Path) -> None:
    first = clean_local.report
    storage = Storage()
    # The cache is content-addressed: a copy of the corpus is a cache hit, shard by shard.
    corpus = tmp_path / "corpus"
    shutil.copytree(sample.corpus, corpus)
    changed = corpus / "shard-00002.parquet"
    t = pq.read_table(changed)
    pq.write_table(t.slice(0, t.num_rows - 1), changed)  # drop its last row
    extra = make_sample(str(tmp_path / "extra"), docs=6, queries=1, shards=1, seed=12, image_size=40)
    et = pq.read_table(extra.shard_uris[0])
    et = et.set_column(et.schema.get_field_index("doc_id"), "doc_id",
                       pa.array([f"new-{i:03d}" for i in range(et.num_rows)], pa.string()))
    pq.write_table(et, corpus / "shard-00009.parquet")
    shards_now = len(list(corpus.glob("*.parquet")))
    rows_now = sum(pq.ParquetFile(p).metadata.num_rows for p in corpus.glob("*.parquet"))

    cfg = _cfg(clean_local.root, str(corpus), sample.queries)
    done = _run_watched(cfg)
    ref = build_reference(cfg)
    assert {f"new-{i:03d}" for i in range(et.num_rows)} <= set(ref.doc_ids)
    _check_run(done, ref, rows_now)

    stats = storage.read_json(join(done.report.run_dir, "stats.json"))["stages"]
    ec = stats["embed_corpus"]
    assert (ec["shards"], ec["shards_reused"]) == (shards_now, shards_now - 2), ec
    assert ec["rows_embedded"] == (t.num_rows - 1) + et.num_rows, ec
    eq = stats["embed_queries"]
    assert (eq["shards_reused"], eq["rows_embedded"]) == (eq["shards"], 0), eq
    first_index = storage.read_json(join(first.run_dir, "stats.json"))["stages"]["index"]
    assert stats["index"]["reused"] is False and stats["index"]["uri"] != first_index["uri"]
    assert stats["index"]["rows_ok"] == len(ref.doc_ids)

    # LATEST moved from the first run to this one; the reader saw both, each verified.
    assert done.latest is not None and done.latest["previous"] == first.run_id
    assert done.watcher.seen == [first.run_id, done.report.run_id]
    P.verify_run(storage, first.run_dir, deep=True)  # the older run is untouched


@pytest.mark.slow
def test_resume_of_a_run_that_failed_at_publish_only_publishes(clean_local: Done, tmp_path: Path) -> None:
    """A job that wrote its manifest but died before LATEST moved: ``--resume`` publishes, nothing else."""
    first = clean_local.report
    root = tmp_path / "root"
    shutil.copytree(first.run_dir, root / "runs" / first.run_id)  # complete, never published here
    assert not (root / P.LATEST).exists()
    cfg = clean_local.cfg.model_copy(update={"root": str(root)})
    rep = run(cfg, resume=first.run_id)
    assert rep.published and rep.resumed and rep.run_id == first.run_id
    latest, _ = P.read_latest(Storage(), str(root))
    assert latest is not None and latest["run_id"] == first.run_id
    before = check_manifest(Storage(), join(str(root), "runs", first.run_id), first.run_id)
    with pytest.raises(ValueError, match="already complete"):  # published now: nothing left to do
        run(cfg, resume=first.run_id)
    assert check_manifest(Storage(), join(str(root), "runs", first.run_id), first.run_id) == before


@pytest.mark.slow
def test_a_swallowed_sigterm_stops_the_run_at_the_next_boundary_and_publishes_nothing(
        clean_local: Done, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``run()`` checks for a SIGTERM whose exception was lost (``TERMINATE_REQUESTED``) after each stage and
    before LATEST: a stop after search keeps search and publishes nothing; a stop while the manifest is written
    keeps the complete run unpublished; the same command then only publishes it."""
    from operators import watchdog as W

    root = tmp_path / "root"
    shutil.copytree(clean_local.root, root)  # its embedding cache and index: only search and rerank run here
    cfg = clean_local.cfg.model_copy(update={"root": str(root)})
    before = P.read_latest(Storage(), str(root))[0]

    def then_sigterm(fn: Callable[..., Any]) -> Callable[..., Any]:
        def inner(*a: Any, **kw: Any) -> Any:
            out = fn(*a, **kw)
            W.TERMINATE_REQUESTED.set()  # as the CLI's handler does when its exception is swallowed
            return out
        return inner

    try:
        monkeypatch.setattr(run_mod, "run_search", then_sigterm(run_mod.run_search))
        with pytest.raises(W.Terminated):
            run(cfg, run_id="stopped")
        run_dir = root / "runs" / "stopped"
        assert (run_dir / "_STAGES" / "search.json").exists() and not (run_dir / "_STAGES" / "rerank.json").exists()
        assert P.read_latest(Storage(), str(root))[0] == before
        monkeypatch.undo()
        W.TERMINATE_REQUESTED.clear()

        monkeypatch.setattr(run_mod, "write_manifest", then_sigterm(run_mod.write_manifest))
        with pytest.raises(W.Terminated):
            run(cfg, resume="stopped")
        assert (run_dir / P.MANIFEST).exists() and P.read_latest(Storage(), str(root))[0] == before
        monkeypatch.undo()
        W.TERMINATE_REQUESTED.clear()
    finally:
        W.TERMINATE_REQUESTED.clear()
    rep = run(cfg, resume="stopped")
    assert rep.published and P.read_latest(Storage(), str(root))[0]["run_id"] == "stopped"


# ----------------------------------------------------------------------------------------------
# publish protocol under concurrency (no Ray)
# ----------------------------------------------------------------------------------------------


def _fake_run(storage: Storage, root: str, run_id: str, complete: bool = True) -> str:
    run_dir = join(root, "runs", run_id)
    storage.write_table(join(run_dir, "results", "part-b00000.parquet"),
                        pa.table({"query_id": ["q1"], "doc_id": [f"doc-{run_id}"], "rank": pa.array([1], pa.int32())}))
    storage.write_json(join(run_dir, "stats.json"), {"run_id": run_id})
    if complete:
        P.write_manifest(storage, run_dir, run_id, {})
    return run_dir


def _cas(storage: Storage, root: str, data: bytes, token: str | None) -> bool:
    uri = join(root, P.LATEST)
    if scheme_of(root) == "s3":
        return P._cas_s3(storage, uri, data, token)
    return P._cas_local(strip_scheme(uri), data, token)


def _stale_token(root: str) -> str:
    return '"0123456789abcdef0123456789abcdef"' if scheme_of(root) == "s3" else "0" * 64


def test_latest_is_never_overwritten_with_a_stale_token(root_uri: str) -> None:
    storage = Storage()
    _fake_run(storage, root_uri, "run-a")
    _fake_run(storage, root_uri, "run-b")
    _fake_run(storage, root_uri, "run-partial", complete=False)
    first = P.advance_latest(storage, root_uri, "run-a")
    assert first["run_id"] == "run-a" and first["previous"] is None
    before = P.read_latest(storage, root_uri)
    payload = json.dumps({"run_id": "run-b"}).encode()
    # A writer holding a stale version (or none, i.e. "create only") must not replace LATEST.
    for token in (_stale_token(root_uri), None):
        assert _cas(storage, root_uri, payload, token) is False
        assert P.read_latest(storage, root_uri) == before
    # An incomplete run is never published.
    with pytest.raises(P.PublishError, match="incomplete"):
        P.advance_latest(storage, root_uri, "run-partial")
    assert P.read_latest(storage, root_uri) == before
    second = P.advance_latest(storage, root_uri, "run-b")
    assert second["previous"] == "run-a"
    assert P.latest_run(storage, root_uri) == (join(root_uri, "runs", "run-b"),
                                               P.verify_run(storage, join(root_uri, "runs", "run-b")))


def test_cas_s3_reports_a_refused_conditional_write(s3_bucket: str) -> None:
    storage = Storage()
    root = f"{s3_bucket}/root"
    _fake_run(storage, root, "run-a")
    P.advance_latest(storage, root, "run-a")
    assert _cas(storage, root, b'{"run_id": "x"}', _stale_token(root)) is False
    assert _cas(storage, root, b'{"run_id": "x"}', None) is False


@pytest.mark.parametrize("root_uri", ["local", "s3"], indirect=True)
def test_racing_publishers_never_lose_an_update(root_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads publish at once, three rounds. Both read the same LATEST version before either writes
    (forced), so one conditional write is refused every round and must retry on top of the other."""
    storage = Storage()
    runs = ("run-a", "run-b")
    for r in runs:
        _fake_run(storage, root_uri, r)

    read_latest, cas_s3, cas_local = P.read_latest, P._cas_s3, P._cas_local
    barrier = threading.Barrier(2)
    write_lock = threading.Lock()  # writes one at a time: the store, not luck, must refuse the stale one
    local = threading.local()

    def synced_read(st: Storage, root: str) -> Any:
        out = read_latest(st, root)
        if threading.current_thread().name.startswith("publisher") and not getattr(local, "synced", False):
            local.synced = True
            barrier.wait(timeout=120)
        return out

    def serial(fn: Callable[..., bool]) -> Callable[..., bool]:
        def inner(*a: Any) -> bool:
            with write_lock:
                return fn(*a)
        return inner

    monkeypatch.setattr(P, "read_latest", synced_read)
    monkeypatch.setattr(P, "_cas_s3", serial(cas_s3))
    monkeypatch.setattr(P, "_cas_local", serial(cas_local))

    previous = None
    for _ in range(3):
        returned: dict[str, dict[str, Any]] = {}
        errors: list[BaseException] = []

        def publish(run_id: str, out: dict[str, dict[str, Any]] = returned, errs: list[BaseException] = errors) -> None:
            try:
                out[run_id] = P.advance_latest(storage, root_uri, run_id)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errs.append(e)
                barrier.abort()

        threads = [threading.Thread(target=publish, args=(r,), name=f"publisher-{r}") for r in runs]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=300)
        if errors:
            raise errors[0]
        assert set(returned) == set(runs)
        raw = storage.read_bytes(join(root_uri, P.LATEST))
        final = json.loads(raw)  # valid JSON, never a torn write
        assert final["run_id"] in runs
        other = runs[1 - runs.index(final["run_id"])]
        # No lost update: the last writer saw the other one; the other one saw the previous round.
        assert final["previous"] == other
        assert returned[other]["previous"] == previous
        assert P.latest_run(storage, root_uri)[0] == join(root_uri, "runs", final["run_id"])
        previous = final["run_id"]


def test_start_reports_the_failed_check_even_when_ray_fails_too(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Preflight runs while Ray starts: its error is the one raised, and only once Ray's start returned."""
    cfg = _cfg(str(tmp_path / "root"), "corpus", "queries")
    checked = threading.Event()

    def bad_preflight(c: Config, s: Storage) -> None:
        checked.set()
        raise ValueError("corpus: missing input")

    def ray_start(rc: Any) -> dict[str, float]:
        # Returns only once the check has run: were the two sequential (Ray first), this would time out.
        assert checked.wait(60), "preflight did not run while Ray was starting"
        raise RuntimeError("ray did not start")

    monkeypatch.setattr(run_mod, "preflight", bad_preflight)
    monkeypatch.setattr(run_mod, "ensure_ray", ray_start)
    with pytest.raises(ValueError, match="corpus: missing input"):
        run_mod.start(cfg, Storage())
    monkeypatch.setattr(run_mod, "ensure_ray", lambda rc: {"CPU": 2.0})
    with pytest.raises(ValueError, match="corpus: missing input"):
        run_mod.start(cfg, Storage())
    monkeypatch.setattr(run_mod, "preflight", lambda c, s: None)
    assert run_mod.start(cfg, Storage()) == {"CPU": 2.0}


def test_write_manifest_leaves_out_interrupted_temp_files(tmp_path: Path) -> None:
    storage = Storage()
    run_dir = _fake_run(storage, str(tmp_path / "root"), "run-t", complete=False)
    Path(run_dir, "results", "part-b00001.parquet.tmp-4242").write_bytes(b"PAR1 half written")
    files = P.write_manifest(storage, run_dir, "run-t", {})["files"]
    assert "results/part-b00000.parquet" in files
    assert not [f for f in files if ".tmp" in f], sorted(files)


def test_scored_parts_of_two_candidate_parts_do_not_overwrite_each_other(tmp_path: Path) -> None:
    """Search writes one candidates part per (query shard, write call); rerank must keep every pair."""
    from operators.rerank_ops import ScoredSink, bucket_candidates, docs_for_shards, explode

    storage = Storage()
    run_dir = str(tmp_path / "run")
    corpus = str(tmp_path / "corpus.parquet")
    pq.write_table(pa.table({"doc_id": ["d0", "d1", "d2"], "image": [b"x", b"y", b"z"], "text": ["a", "b", "c"]}),
                   corpus)
    queries = str(tmp_path / "queries.parquet")
    pq.write_table(pa.table({"query_id": ["q1", "q2"], "text": ["one", "two"]}), queries)
    for name, q in (("part-qa-000000000000", "q1"), ("part-qb-000000000000", "q2")):
        storage.write_table(join(run_dir, "candidates", f"{name}.parquet"), pa.table({
            "query_id": [q, q], "rank": pa.array([1, 2], pa.int32()), "doc_id": ["d0", "d2"],
            "retrieval_score": pa.array([0.9, 0.8], pa.float32()), "doc_shard": ["k", "k"],
            "doc_row": pa.array([0, 2], pa.int64())}))
        bucket_candidates(join(run_dir, "candidates", f"{name}.parquet"), name, join(run_dir, "_pairs"), [queries])
    sink = ScoredSink(run_dir, buckets=1)
    reported = 0
    # Each regrouped candidates file streamed on its own: what separate write tasks of a large run see.
    for pairs_file in storage.ls(join(run_dir, "_pairs", "k"), "*.parquet"):
        for block in docs_for_shards([(corpus, "image", [pairs_file], None, None, None)], None, 256):
            batch = explode(block)
            batch["rerank_score"] = np.ones(len(batch["doc_id"]), np.float32)
            reported += sum(r["rows_ok"] for r in sink.write_batch(batch))
    assert reported == 4
    on_storage = read_rows(storage, join(run_dir, "scored"))
    assert sorted((r["query_id"], r["doc_id"]) for r in on_storage) == [("q1", "d0"), ("q1", "d2"),
                                                                         ("q2", "d0"), ("q2", "d2")]


def test_resume_refuses_a_run_started_with_another_config(sample: SampleInfo, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.run as run_mod

    storage = Storage()
    root = str(tmp_path / "root")
    old = run_cfg_dict(root, sample.corpus, sample.queries)
    old["search"]["k"] = 3
    storage.write_json(join(root, "runs", "r-old", "_RUN.json"), {
        "run_id": "r-old", "config_fingerprint": run_mod.config_fingerprint(parse_config(old)),
        "started": "2026-01-01T00:00:00Z"})
    storage.write_json(join(root, "runs", "r-old", "_STAGES", "search.json"), {"rows_in": 5})

    class WorkStarted(Exception):
        pass

    def no_work(*a: Any, **kw: Any) -> Any:
        raise WorkStarted("the run went ahead with a config it was not started with")

    monkeypatch.setattr(run_mod, "embed_kind", no_work)
    with pytest.raises(ValueError, match="config"):
        run(_cfg(root, sample.corpus, sample.queries), resume="r-old")
