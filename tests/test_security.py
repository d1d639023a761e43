"""Security properties, checked on the real components (nothing under test is mocked).

* No secrets anywhere. The nightly job runs twice through the CLI's ``main(["-vv", "run", ...])``
  (DEBUG logging, botocore's request dumps included; main() installs its own stderr handler as in a
  terminal, and everything written to fd 1/2 is kept) on one s3:// root of the moto server on 127.0.0.1:
  with the sentinel credentials from the environment only, then with other credentials in the config's
  ``storage`` section. Ray is this module's own (``ensure_ray``, ``RAY_TMPDIR`` private to the module), so
  its session directory holds exactly these runs and the Serve app. The key ids and secret keys are
  then searched for in: every object of the bucket (bytes, key names, metadata; Parquet decoded, its
  pages are compressed), the whole output of both runs, every file of the Ray session directory
  (binary-safe; again after the Serve app served the run from s3://), the job's ``runtime_env``, and
  ``mmrerank validate``'s output and error path.
* Pickled code is refused. Checkpoints whose unpickling would write a marker file: an open_clip
  checkpoint on s3:// loaded by the embedder actor class, a transformers reranker directory holding
  only ``pytorch_model.bin``, a LoRA adapter holding only ``adapter_model.bin``. Each is refused with a
  one-line error and the marker never appears; then the same file is unpickled unsafely to prove the
  payload is live. (A local open_clip ``.pt`` loaded by ``build_model`` is in test_models.py.)
* Loopback. After ``ensure_ray`` started a local Ray and the Serve app started on it: the Serve HTTP
  port listens on loopback only, no dashboard and no Serve gRPC port listen, and no process of the
  local Ray listens on anything but loopback (ensure_ray starts it in Ray's single-node mode), except
  Ray Serve's per-replica gRPC server, hard-coded on ``[::]`` upstream.
* Boundary. What test_serve.py does not cover, over raw HTTP: ids with path traversal, control
  characters or 8 KiB; k beyond int64, infinities and NaN; deeply nested JSON; lone surrogates.

One Ray for the module: the two runs first, then the Serve app on the published run.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, S3Server, bucket_keys, free_port
from tests.reference import lean

# Config-borne credentials (moto accepts any): must never show up anywhere either.
CFG_ACCESS_KEY_ID = "cfg-key-id-SEC-4417"
CFG_SECRET_ACCESS_KEY = "cfg-secret-SEC-d00dfeed"
CFG_SESSION_TOKEN = "cfg-session-token-SEC-77aa"
SECRETS = (TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, CFG_ACCESS_KEY_ID, CFG_SECRET_ACCESS_KEY, CFG_SESSION_TOKEN)
HEALTH_DEADLINE_S = 240.0  # a hang guard on a loaded 2-core box, not a performance claim
# 3 logical CPUs on the 2 cores: the Serve app's two replicas hold one each (after the runs).
RAY = {"num_cpus": 3, "progress_bars": False}


def _leaks(where: str, blob: bytes | str) -> list[str]:
    data = blob.encode("utf-8", "surrogatepass") if isinstance(blob, str) else blob
    return [f"{where}: contains {s[:10]}..." for s in SECRETS if s.encode() in data]


# ----------------------------------------------------------------------------------------------
# module setup: sample, bucket, this module's Ray, the two runs
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """A short private directory: Ray puts unix sockets under RAY_TMPDIR (paths are limited to ~107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="mmr-sec-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def sample(scratch: Path) -> Any:
    from pipelines.sample import make_sample

    # bad_rows: the run writes rejects (with error messages) too.
    return make_sample(str(scratch / "sample"), docs=20, queries=4, shards=2, seed=3, bad_rows=True, image_size=32)


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> Iterator[str]:
    """The module's bucket (its name); emptied and deleted after."""
    from tests.seaweed import fresh_bucket

    with fresh_bucket(s3_server, prefix="mmr-sec") as uri:
        yield uri.removeprefix("s3://")


def _cfg(root: str, sample: Any, storage: dict[str, Any] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {
        "root": root, "corpus": sample.corpus, "queries": sample.queries, "ray": RAY,
        "embed": {"batch_size": 16, "torch_threads": 2},
        "index": {"factory": "Flat", "shards": 2},
        "search": {"k": 5, "searcher_num_cpus": 0.25},
        "rerank": {"backend": "clip", "batch_size": 16, "select_buckets": 2, "torch_threads": 2,
                   "selection": {"mode": "top_n", "top_n": 3}},
    }
    if storage:
        d["storage"] = storage
    return lean(d)


def _cfg_storage(s3: S3Server) -> dict[str, Any]:
    return {"endpoint_url": s3.endpoint_url, "region": s3.region, "access_key_id": CFG_ACCESS_KEY_ID,
            "secret_access_key": CFG_SECRET_ACCESS_KEY}


@pytest.fixture(scope="module")
def local_ray(scratch: Path, s3_server: S3Server) -> Iterator[Path]:
    """This module's Ray, started by ``pipelines.ray_env.ensure_ray`` (as every pipeline command starts it)
    under a private ``RAY_TMPDIR``; yields its session directory. The S3 server is up first: workers
    inherit the driver's environment (its sentinel credentials) when Ray starts."""
    import ray

    from pipelines.config import RayConfig
    from pipelines.ray_env import ensure_ray

    ray_tmp = scratch / "ray"
    ray_tmp.mkdir()
    mp = pytest.MonkeyPatch()
    for k, v in dict(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                     RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_ADDRESS="local", RAY_TMPDIR=str(ray_tmp)).items():
        mp.setenv(k, v)
    try:
        if ray.is_initialized():
            ray.shutdown()
        ensure_ray(RayConfig(**RAY))  # what the runs' ensure_ray(cfg.ray) would start
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        assert session.is_relative_to(ray_tmp), session  # this module's own Ray, not someone else's
        try:
            yield session
        finally:
            with contextlib.suppress(Exception):
                from ray import serve

                serve.shutdown()
            ray.shutdown()
    finally:
        mp.undo()


@contextlib.contextmanager
def _fds_to(path: Path) -> Iterator[None]:
    """stdout and stderr of this process, at the file descriptor level, into ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(path, "wb") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


def _cli(request: pytest.FixtureRequest, argv: list[str], out: Path) -> int:
    """``pipelines.cli.main(argv)`` as in a terminal; ``out`` gets everything this process wrote meanwhile.

    pytest's log handlers are taken off the root logger, so main() installs its own stderr handler (with
    its filters) as it does in a terminal. What reaches file descriptors 1/2 (C++ core worker, Ray's
    log_to_driver, anything holding the real stderr) is redirected into a file; what went to pytest's
    sys.stdout/sys.stderr stand-ins (the CLI's handler, Ray Data's console handler) is read back from the
    capture manager. Both together are the run's output."""
    from pipelines.cli import main

    capman = request.config.pluginmanager.getplugin("capturemanager")
    capturing = capman is not None and capman.is_globally_capturing()
    if capturing:
        capman.read_global_capture()  # what came before is not this run's
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {n: lg.level for n, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    fd_out = out.with_suffix(".fd")
    try:
        with _fds_to(fd_out):
            for h in handlers:
                root.removeHandler(h)
            try:
                return main(argv)
            finally:
                for h in root.handlers[:]:
                    root.removeHandler(h)
                for h in handlers:
                    root.addHandler(h)
                root.setLevel(level)  # and every logger's level as it was (-vv set some to DEBUG)
                for n, lg in logging.root.manager.loggerDict.items():
                    if isinstance(lg, logging.Logger):
                        lg.setLevel(levels.get(n, logging.NOTSET))
    finally:
        sys_out, sys_err = capman.read_global_capture() if capturing else ("", "")
        out.write_bytes(fd_out.read_bytes() + sys_out.encode("utf-8", "replace") + sys_err.encode("utf-8", "replace"))


@dataclass
class Runs:
    bucket: str
    root: str
    run_ids: tuple[str, ...]
    outputs: tuple[Path, ...]  # everything written to stdout/stderr during each run


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, local_ray: Path, scratch: Path, sample: Any, bucket: str,
         s3_server: S3Server) -> Runs:
    """``mmrerank -vv run`` twice on the same s3:// root: credentials from the environment only, then
    other credentials in the config (the environment's are still set)."""
    root = f"s3://{bucket}/root"
    plan = (("sec-env", _cfg(root, sample)), ("sec-cfg", _cfg(root, sample, _cfg_storage(s3_server))))
    outputs = []
    for run_id, cfg in plan:
        cfg_path = scratch / f"{run_id}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out = scratch / f"{run_id}.out"
        rc = _cli(request, ["-vv", "run", str(cfg_path), "--run-id", run_id], out)
        tail = "\n".join(out.read_text(errors="replace").splitlines()[-40:])
        assert rc == 0, f"mmrerank run {run_id} returned {rc}:\n{tail}"
        outputs.append(out)
    return Runs(bucket, root, tuple(r for r, _ in plan), tuple(outputs))


# ----------------------------------------------------------------------------------------------
# 1. no secrets anywhere
# ----------------------------------------------------------------------------------------------


def _parquet_text(data: bytes) -> bytes:
    """A Parquet file's decoded content and metadata (its pages are compressed: raw bytes prove nothing)."""
    f = pq.ParquetFile(pa.BufferReader(data))
    t = f.read()
    parts = [repr(f.metadata.metadata), repr(t.schema), json.dumps(t.to_pylist(), default=repr)]
    return "\n".join(parts).encode("utf-8", "surrogatepass")


def test_no_secret_in_any_object_of_the_bucket(runs: Runs, s3_server: S3Server) -> None:
    client = s3_server.client()
    keys = bucket_keys(client, runs.bucket)
    # The scan covers everything the runs publish (a vacuous scan would pass too).
    for run_id in runs.run_ids:
        for rel in ("_RUN.json", "_MANIFEST.json", "stats.json"):
            assert f"root/runs/{run_id}/{rel}" in keys, (run_id, rel, keys[:20])
        assert any(k.startswith(f"root/runs/{run_id}/results/") for k in keys), run_id
        assert any(k.startswith(f"root/runs/{run_id}/rejects/") for k in keys), run_id
    assert "root/LATEST" in keys
    assert any(k.startswith("root/embeddings/") and k.endswith("/model.json") for k in keys)
    assert any(k.startswith("root/indexes/") and k.endswith(".faiss") for k in keys)
    leaks: list[str] = []
    parquet = 0
    for key in keys:
        obj = client.get_object(Bucket=runs.bucket, Key=key)
        data = obj["Body"].read()
        where = f"s3://{runs.bucket}/{key}"
        leaks += _leaks(f"{where} (key)", key)
        leaks += _leaks(f"{where} (metadata)", json.dumps(obj.get("Metadata", {})))
        leaks += _leaks(where, data)
        if key.endswith(".parquet"):
            leaks += _leaks(f"{where} (decoded)", _parquet_text(data))
            parquet += 1
    assert parquet >= 4, parquet
    assert not leaks, "\n".join(leaks)
    # The published config is there, with its non-secret storage settings and without the secret ones.
    run_cfg = json.loads(client.get_object(Bucket=runs.bucket, Key=f"root/runs/{runs.run_ids[-1]}/_RUN.json")["Body"].read())
    storage = run_cfg["config"]["storage"]
    assert storage["endpoint_url"] == s3_server.endpoint_url
    assert not {"access_key_id", "secret_access_key", "session_token"} & set(storage), storage


def test_no_secret_in_the_cli_output_at_debug_level(runs: Runs) -> None:
    for out in runs.outputs:
        text = out.read_bytes()
        # -vv really logged at DEBUG, botocore's request dumps (headers included) among it.
        assert b" DEBUG " in text, out
        assert b"Sending http request" in text, f"{out}: no botocore DEBUG output to check"
        assert b"stage rerank done" in text, out
        leaks = _leaks(str(out), text)
        assert not leaks, "\n".join(leaks)


def _regular_files(root: Path) -> list[Path]:
    out = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath, n)
            with contextlib.suppress(OSError):
                if stat.S_ISREG(p.lstat().st_mode):  # not the unix sockets, not symlinks
                    out.append(p)
    return out


def _scan_session(session: Path) -> list[str]:
    files = _regular_files(session)
    names = {p.name for p in files}
    logs = [p for p in files if p.parent.name == "logs" or "logs" in p.parts]
    # Really Ray's session of a run: its daemons' and workers' logs are there.
    assert {"raylet.out", "gcs_server.out"} <= names, sorted(names)[:40]
    assert any(n.startswith("worker-") for n in names), sorted(names)[:40]
    assert len(logs) >= 10, len(logs)
    leaks: list[str] = []
    for p in files:
        with contextlib.suppress(OSError):
            leaks += _leaks(str(p), p.read_bytes())
    return leaks


def test_no_secret_in_the_ray_session_of_the_runs(runs: Runs, local_ray: Path) -> None:
    time.sleep(1)  # the log monitor's last lines
    leaks = _scan_session(local_ray)
    assert not leaks, "\n".join(leaks)


def test_validate_and_config_errors_leave_secrets_out(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    from pipelines.cli import main
    from pipelines.config import load_config

    # Values no earlier call in this process has seen (nothing can have registered them for redaction).
    tag = uuid.uuid4().hex[:8]
    key_id, secret, token = f"val-key-id-{tag}", f"val-secret-{tag}", f"val-token-{tag}"

    def leaks(where: str, text: str) -> list[str]:
        return _leaks(where, text) + [f"{where}: contains {s[:10]}..." for s in (key_id, secret, token) if s in text]

    def validate(*argv: str) -> tuple[int, str, str]:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            rc = main(["validate", *argv])
        out = capsys.readouterr()
        return rc, out.out, out.err + caplog.text

    cfg = {"root": "s3://some-bucket/root", "corpus": "s3://some-bucket/corpus", "queries": "s3://some-bucket/q",
           "storage": {"endpoint_url": "http://127.0.0.1:9", "region": "eu-west-1",
                       "access_key_id": key_id, "secret_access_key": secret, "session_token": token}}

    # Errors first (before a good config of these values was ever loaded). A YAML syntax error on the line
    # holding a secret: PyYAML's message quotes that line.
    text = yaml.safe_dump(cfg, sort_keys=False).replace(f"secret_access_key: {secret}",
                                                        f'secret_access_key: "{secret}')
    assert f'"{secret}' in text
    broken = tmp_path / "broken.yaml"
    broken.write_text(text)
    rc, out, err = validate(str(broken))
    assert rc == 2 and "not valid YAML" in err, (rc, out, err)
    assert not leaks("YAML error", out + err), err
    # Invalid fields, a credential among them: exit 2, fields named, no value.
    bad = dict(cfg, storage={**cfg["storage"], "secret_access_key": [secret]}, embed={"batch_sizee": key_id})
    bad_path = tmp_path / "bad.yaml"
    bad_path.write_text(yaml.safe_dump(bad))
    rc, out, err = validate(str(bad_path))
    assert rc == 2 and "storage.secret_access_key" in err and "embed.batch_sizee" in err, (rc, err)
    assert not leaks("validate error", out + err), err

    # A valid config: printed resolved, storage section included, its secrets left out.
    path = tmp_path / "with-secrets.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, out, err = validate(str(path))
    assert rc == 0, err
    printed = yaml.safe_load(out)
    assert printed["storage"]["endpoint_url"] == "http://127.0.0.1:9" and printed["storage"]["region"] == "eu-west-1"
    assert not {"access_key_id", "secret_access_key", "session_token"} & set(printed["storage"]), printed["storage"]
    assert not leaks("validate output", out + err)
    # A secret given through --set is left out too.
    other = f"set-token-{tag}"
    rc, out, err = validate(str(path), "--set", f"storage.session_token={other}")
    assert rc == 0 and other not in out + err and not leaks("validate --set output", out + err)
    # The loaded config: repr/str/JSON dump/options never show them either.
    loaded = load_config(path)
    for text in (repr(loaded), str(loaded), repr(loaded.storage), repr(loaded.storage.options()),
                 loaded.model_dump_json(), json.dumps(loaded.redacted_dump())):
        assert not leaks("config repr", text), text


# ----------------------------------------------------------------------------------------------
# 2. checkpoints that would run code when unpickled are refused
# ----------------------------------------------------------------------------------------------


class _Evil:
    """Unpickling this runs ``exec(code)``: the classic pickle code-execution payload."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (self.code,))


def _evil(marker: Path) -> _Evil:
    return _Evil(f"open({str(marker)!r}, 'w').write('pwned')")


def _prove_live(path: Path, marker: Path) -> None:
    """Control: unpickled without protection, this very file runs its payload."""
    import torch

    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned", "the payload is not live: the refusal above proves nothing"


def _one_clear_line(msg: str, *words: str) -> None:
    assert "\n" not in msg, f"not one line: {msg!r}"
    for w in words:
        assert w in msg, (w, msg)
    # Never tell the user how to switch the protection off.
    assert "weights_only` set to `False`" not in msg and "weights_only=False" not in msg, msg


def test_open_clip_checkpoint_on_s3_running_code_is_refused_by_the_embedder(tmp_path: Path, bucket: str,
                                                                            s3_server: S3Server) -> None:
    import torch

    from operators import models
    from operators.embedders import ImageEmbedder
    from operators.models import ModelLoadError, ModelSpec, resolve_model

    marker = tmp_path / "pwned-openclip"
    local = tmp_path / "evil.pt"
    torch.save({"state_dict": {"visual.proj": _evil(marker)}}, local)  # open_clip's checkpoint layout
    key = f"ckpt/{uuid.uuid4().hex[:8]}/evil.pt"
    s3_server.client().upload_file(str(local), bucket, key)
    uri = f"s3://{bucket}/{key}"
    rm = resolve_model(ModelSpec(name="mmr-tiny", pretrained=uri))
    assert rm.weights == "file" and rm.checkpoint_uri == uri
    with pytest.raises(ModelLoadError) as ei:
        ImageEmbedder(rm, device="cpu", precision="fp32", torch_threads=1)  # what each embedder actor does
    assert not marker.exists(), "the checkpoint's pickled code ran"
    _one_clear_line(str(ei.value), uri, "refused", "safetensors")
    _prove_live(local, marker)
    # The process-wide download cache keeps its temp copy of the checkpoint: not this test's to leave behind.
    Path(models._download_cached(uri, None)).unlink(missing_ok=True)
    models._download_cached.cache_clear()


@pytest.fixture(scope="module")
def offline_hf() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.mark.parametrize("backend", ["cross_encoder", "blip_itm"])
def test_hf_reranker_dir_with_only_a_pickle_is_refused(backend: str, tmp_path: Path, offline_hf: None) -> None:
    import torch

    from operators.rerankers.base import RerankerLoadError, RerankerSpec, create
    from tests.tiny_hf import save_tiny_bert, save_tiny_blip

    d = tmp_path / backend
    if backend == "cross_encoder":
        save_tiny_bert(d, num_labels=1, seed=2)
        first = "bert.embeddings.word_embeddings.weight"
    else:
        save_tiny_blip(d, seed=1)
        first = "vision_model.embeddings.patch_embedding.weight"
    (d / "model.safetensors").unlink()
    marker = tmp_path / f"pwned-{backend}"
    torch.save({first: _evil(marker)}, d / "pytorch_model.bin")  # the legacy transformers weights file
    with pytest.raises(RerankerLoadError) as ei:
        create(RerankerSpec(backend=backend, model=str(d), max_length=16))
    assert not marker.exists(), "the checkpoint's pickled code ran"
    _one_clear_line(str(ei.value), "rerank.model", "safetensors")
    _prove_live(d / "pytorch_model.bin", marker)


def test_lora_adapter_with_only_a_pickle_is_refused(tmp_path: Path, offline_hf: None) -> None:
    import torch

    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    from operators.rerankers.base import RerankerLoadError, RerankerSpec, create
    from tests.tiny_hf import save_tiny_bert

    base = save_tiny_bert(tmp_path / "base", num_labels=1, seed=2)
    adapter = tmp_path / "adapter"
    lora = peft.get_peft_model(AutoModelForSequenceClassification.from_pretrained(base),
                               peft.LoraConfig(r=2, target_modules=["query", "value"]))
    lora.save_pretrained(adapter)
    # Control: the same base + a safetensors adapter loads.
    create(RerankerSpec(backend="cross_encoder", model=str(base), lora_adapter=str(adapter), max_length=16))
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned-lora"
    name = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    torch.save({name: _evil(marker)}, adapter / "adapter_model.bin")
    with pytest.raises(RerankerLoadError) as ei:
        create(RerankerSpec(backend="cross_encoder", model=str(base), lora_adapter=str(adapter), max_length=16))
    assert not marker.exists(), "the adapter's pickled code ran"
    _one_clear_line(str(ei.value), "rerank.lora_adapter", "safetensors")
    _prove_live(adapter / "adapter_model.bin", marker)


# ----------------------------------------------------------------------------------------------
# the Serve app on the published run (the in-process Ray)
# ----------------------------------------------------------------------------------------------




@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Served:
    host: str
    port: int
    settings: Any
    run_id: str
    queries: dict[str, str]

    def request(self, method: str, target: bytes, body: bytes = b"", content_type: str = "application/json") -> Raw:
        """One raw HTTP/1.1 exchange: the request line goes out byte for byte (no client normalising it)."""
        head = [method.encode() + b" " + target + b" HTTP/1.1", f"Host: {self.host}:{self.port}".encode(),
                b"Connection: close"]
        if method == "POST":
            head += [f"Content-Type: {content_type}".encode(), f"Content-Length: {len(body)}".encode()]
        with socket.create_connection((self.host, self.port), timeout=120) as s:
            s.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        raw = b"".join(chunks)
        head_b, _, rest = raw.partition(b"\r\n\r\n")
        lines = head_b.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = (headers.get(k.strip().lower(), "") + "," if k.strip().lower() in headers
                                          else "") + v.strip()
        if headers.get("transfer-encoding") == "chunked":
            body, buf = b"", rest
            while buf:
                size_s, _, buf = buf.partition(b"\r\n")
                size = int(size_s, 16)
                if size == 0:
                    break
                body, buf = body + buf[:size], buf[size + 2:]
            rest = body
        return Raw(status, headers, rest)

    def get(self, target: bytes) -> Raw:
        return self.request("GET", target)

    def post(self, path: str, body: bytes | Any) -> Raw:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.request("POST", path.encode(), data)


@pytest.fixture(scope="module")
def served(local_ray: Path, runs: Runs, sample: Any) -> Iterator[Served]:
    import pyarrow.dataset as ds

    from pipelines.serve import ServeSettings, start

    settings = ServeSettings(root=runs.root, port=free_port(), reload_interval_s=1.0, device="cpu",
                             max_body_bytes=512 * 1024, max_text_chars=500, max_top_k=100, max_top_n=20)
    start(settings)
    queries = {r["query_id"]: r["text"] for r in ds.dataset(sample.queries).to_table().to_pylist()}
    app = Served(settings.host, settings.port, settings, runs.run_ids[-1], queries)
    end = time.monotonic() + HEALTH_DEADLINE_S
    last: Any = None
    while time.monotonic() < end:
        try:
            last = app.get(b"/healthz").json()
            if last.get("status") == "ok":
                break
        except (OSError, ValueError, IndexError) as e:
            last = repr(e)
        time.sleep(0.5)
    else:
        raise AssertionError(f"/healthz not ok after {HEALTH_DEADLINE_S:.0f}s: {last!r}")
    assert last["run_id"] == app.run_id, last
    yield app


# ----------------------------------------------------------------------------------------------
# 3. loopback
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listener:
    ip: str
    port: int
    pid: int
    name: str


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _listeners() -> list[Listener]:
    """Listening TCP sockets of this process and everything it started (Ray's daemons, workers, Serve)."""
    import psutil

    me = psutil.Process()
    procs = {p.pid: p for p in [me, *me.children(recursive=True)]}
    out = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status != psutil.CONN_LISTEN or c.pid not in procs:
            continue
        try:
            name = " ".join(procs[c.pid].cmdline())[:160] or procs[c.pid].name()
        except psutil.Error:
            name = "?"
        out.append(Listener(c.laddr.ip, c.laddr.port, c.pid, name))
    return out


def test_serve_http_listens_on_loopback_only_and_no_dashboard(served: Served) -> None:
    import ray

    listeners = _listeners()
    assert len(listeners) >= 5, listeners  # Ray's daemons and workers are in the tree
    on_port = [s for s in listeners if s.port == served.port]
    assert on_port, f"nothing of this process tree listens on the Serve port {served.port}: {listeners}"
    assert all(_is_loopback(s.ip) for s in on_port), on_port
    # direct ingress (the default): the ingress replica itself listens there
    assert all(s.name.startswith("ray::ServeReplica:mmrerank:Api") for s in on_port), on_port
    assert served.get(b"/healthz").status == 200
    # Another interface of this host does not reach the app: nothing of the tree listens on the port at a wildcard
    # or at any of the machine's own non-loopback addresses (read from its interfaces; no packet is sent to them).
    import psutil

    own = {a.address.split("%", 1)[0] for addrs in psutil.net_if_addrs().values() for a in addrs
           if a.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(a.address)}
    if not _is_loopback(node_ip := ray.util.get_node_ip_address()):
        own.add(node_ip)
    reachable = [s for s in on_port if s.ip in own | {"0.0.0.0", "::"}]
    assert not reachable, (reachable, sorted(own))
    # No dashboard UI/API (include_dashboard=False) and no Serve gRPC ingress (no servicers configured).
    assert not [s for s in listeners if s.port in (8265, 9000)], listeners


def _serve_replica_grpc(listeners: list[Listener], http_port: int) -> set[Listener]:
    """Ray Serve's inter-deployment gRPC server: one per replica, hard-coded on ``[::]:0`` in Ray 2.60
    (ray/serve/_private/replica.py ``_on_initialized``), no option to bind it elsewhere. Known, upstream.
    It is the replica's ``::`` listener that is neither its core worker's port (from the GCS actor table)
    nor the app's HTTP port (the ingress replica listens there itself with direct ingress)."""
    import ray._private.state as ray_state

    core_port = {a["Pid"]: a["Address"]["Port"] for a in ray_state.actors().values()
                 if a.get("State") == "ALIVE" and a.get("Pid")}
    out: set[Listener] = set()
    for pid in {s.pid for s in listeners if s.name.startswith("ray::ServeReplica:")}:
        assert pid in core_port, (pid, core_port)
        extra = [s for s in listeners if s.pid == pid and s.port not in (core_port[pid], http_port)]
        assert len(extra) <= 1, f"replica {pid} listens on more than its core worker and gRPC ports: {extra}"
        out.update(s for s in extra if s.ip == "::")
    return out


def test_local_ray_listens_on_loopback_only(served: Served) -> None:
    listeners = _listeners()
    assert len(listeners) >= 5, listeners
    assert any(s.name.startswith("ray::ServeReplica:") for s in listeners), listeners
    known = _serve_replica_grpc(listeners, served.port)
    exposed = sorted({s for s in listeners if not _is_loopback(s.ip)} - known, key=lambda s: (s.pid, s.port))
    assert not exposed, "listening beyond loopback:\n" + "\n".join(f"  {s.ip}:{s.port} pid {s.pid} {s.name}"
                                                                    for s in exposed)


# ----------------------------------------------------------------------------------------------
# 4. inputs validated at the boundary (what test_serve.py does not cover)
# ----------------------------------------------------------------------------------------------


def _file_contents_leak(body: bytes) -> bool:
    """Content of LATEST / a manifest / stats.json / /etc/passwd in a response."""
    return any(w in body for w in (b'"manifest"', b'"previous"', b"config_fingerprint", b"root:x:0:0", b'"files"'))


def test_results_ids_are_lookups_never_paths(served: Served) -> None:
    qid = sorted(served.queries)[0]
    ok = served.get(f"/v1/results/{qid}".encode())
    assert ok.status == 200 and ok.json()["query_id"] == qid, ok
    run = served.run_id.encode()
    targets = [
        b"/v1/results/..", b"/v1/results/../LATEST", b"/v1/results/../../LATEST",
        b"/v1/results/..%2F..%2FLATEST", b"/v1/results/%2e%2e%2f%2e%2e%2fLATEST",
        b"/v1/results/..%5C..%5CLATEST", b"/v1/results/%2Fetc%2Fpasswd", b"/v1/results/..%2F..%2F..%2Fetc%2Fpasswd",
        b"/v1/results/runs%2F" + run + b"%2Fstats.json", b"/v1/results/..%2Fruns%2F" + run + b"%2F_MANIFEST.json",
        b"/v1/results/" + qid.encode() + b"%00", b"/v1/results/" + qid.encode() + b"%2F..",
        b"/v1/results/%00", b"/v1/results/%0d%0aSet-Cookie:%20pwned=1", b"/v1/results/a%0aX-Injected:%201",
        b"/v1/results/%ED%A0%80", b"/v1/results/%FF%FE", b"/v1/results/%E2%80%AE" + qid.encode(),
        b"/v1/results/" + b"q" * 8192,
    ]
    for t in targets:
        r = served.get(t)
        assert 400 <= r.status < 500, (t[:80], r.status, r.body[:200])
        assert r.status != 200 and not _file_contents_leak(r.body), (t[:80], r.body[:300])
        assert "set-cookie" not in r.headers and "x-injected" not in r.headers, (t[:80], r.headers)
        if r.status == 404 and r.body.startswith(b"{"):
            assert "json" in r.headers.get("content-type", ""), r.headers
    # Raw control characters in the request line are refused by the HTTP parser itself.
    for t in (b"/v1/results/a\x00b", b"/v1/results/a\rb"):
        try:
            r = served.get(t)
        except (OSError, IndexError, ValueError):
            continue  # connection closed: refused
        assert 400 <= r.status < 500, (t, r.status)
    # and the app still answers
    assert served.get(f"/v1/results/{qid}".encode()).status == 200


def test_k_and_n_out_of_range_or_not_integers_are_422(served: Served) -> None:
    qid = sorted(served.queries)[0]
    search_bodies: list[bytes] = [
        json.dumps({"text": "x", "top_k": 10**30}).encode(),
        json.dumps({"text": "x", "top_k": -(2**63)}).encode(),
        json.dumps({"text": "x", "top_k": 2**63}).encode(),
        json.dumps({"text": "x", "top_n": 10**30}).encode(),
        json.dumps({"text": "x", "top_k": 1.5}).encode(),
        json.dumps({"text": "x", "top_k": [5]}).encode(),
        json.dumps({"text": "x", "top_k": {"$gt": 0}}).encode(),
        json.dumps({"text": ["x"]}).encode(),
        json.dumps({"text": {"$ne": ""}}).encode(),
        b'{"text": "x", "top_k": 1e400}',
        b'{"text": "x", "top_k": Infinity}',
        b'{"text": "x", "top_k": NaN}',
        b'{"text": "x", "top_n": -Infinity}',
    ]
    for body in search_bodies:
        r = served.post("/v1/search", body)
        assert r.status == 422, (body[:100], r.status, r.body[:300])
    img = base64.b64encode(b"not an image").decode()
    for body in ({"query": "q", "documents": [{"image_b64": img}], "top_n": 10**30},
                 {"query": "q", "documents": [{"image_b64": img}], "top_n": 2.5},
                 {"query": "q", "documents": "abc"}, {"query": ["q"], "documents": ["a"]}):
        r = served.post("/v1/rerank", body)
        assert r.status == 422, (str(body)[:100], r.status, r.body[:300])
    for t in (f"/v1/results/{qid}?top_n={10**30}", f"/v1/results/{qid}?top_n=-{2**63}",
              f"/v1/results/{qid}?top_n=1e3", f"/v1/results/{qid}?top_n=inf", f"/v1/results/{qid}?top_n=nan"):
        r = served.get(t.encode())
        assert r.status == 422, (t, r.status, r.body[:300])


def test_hostile_json_is_4xx_never_5xx(served: Served) -> None:
    depth = 100_000  # 200 KB, under the body limit: the JSON parser's recursion limit, not the size, trips
    nested = b'{"text": "x", "top_k": ' + b"[" * depth + b"]" * depth + b"}"
    assert len(nested) < served.settings.max_body_bytes
    cases: list[tuple[str, bytes]] = [
        ("/v1/search", nested),
        ("/v1/rerank", b'{"query": "q", "documents": ' + b"[" * depth + b"]" * depth + b"}"),
        ("/v1/search", b'{"text": "\\ud800"}'),  # a lone surrogate: valid JSON, not encodable text
        ("/v1/search", b'{"text": "a\\udfffb", "rerank": false}'),
        ("/v1/rerank", b'{"query": "\\ud800", "documents": ["a"]}'),
        ("/v1/rerank", b'{"query": "q", "documents": [{"text": "\\udc00"}]}'),
        ("/v1/search", b'{"text": "x", "top_k": 5, "\\ud800": 1}'),  # in an unknown field's name
        ("/v1/search", b'{"text": "x", "top_k": "\\ud800"}'),  # in a value echoed by the 422 detail
        ("/v1/search", b'{"text": "x", "text": "y", "top_k": 5, "top_k": -1}'),  # duplicate keys
        ("/v1/search", b"\xef\xbb\xbf" + b'{"text": "x"}'),  # UTF-8 BOM
        ("/v1/search", b'{"text": "x\xff\xfe"}'),  # invalid UTF-8 in the body
    ]
    for path, body in cases:
        r = served.post(path, body)
        assert 400 <= r.status < 500 or r.status == 200, (path, body[:60], r.status, r.body[:300])
        assert r.status < 500, (path, body[:60], r.status, r.body[:300])
    # Text with control and bidi characters is data: answered (or refused) like any text, never a 5xx.
    r = served.post("/v1/search", {"text": "a\x00b\x1b[31m\u202ec\r\nSet-Cookie: x=1", "top_k": 3})
    assert r.status == 200 and "set-cookie" not in r.headers, (r.status, r.body[:300])
    assert served.get(b"/healthz").json()["status"] == "ok"


# ----------------------------------------------------------------------------------------------
# 1 (end). the in-process Ray that served the run: its session and the job's runtime_env
# ----------------------------------------------------------------------------------------------


def test_no_secret_in_the_in_process_ray_session_and_runtime_env(served: Served, local_ray: Path) -> None:
    import ray

    # This Ray ran both runs, then served the last one from s3:// (environment credentials).
    assert served.get(f"/v1/results/{sorted(served.queries)[0]}".encode()).status == 200
    env_vars = (ray.get_runtime_context().runtime_env or {}).get("env_vars", {})
    assert "AWS_ENDPOINT_URL" in env_vars  # non-secret settings are forwarded...
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env_vars)  # ...secrets not
    assert not _leaks("runtime_env", json.dumps(ray.get_runtime_context().runtime_env))
    time.sleep(2)  # let the log monitor flush what the replicas printed
    leaks = _scan_session(local_ray)
    assert not leaks, "\n".join(leaks)
