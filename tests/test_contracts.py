"""operators/ without Ray: every UDF module imports, and its UDFs run on plain Arrow tables, with ``import ray``
failing. Only the two Ray Data sources (shard_source, pair_source) may need Ray at import time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: the test process itself has Ray imported by other tests.
CHILD = r'''
import sys

sys.modules["ray"] = None  # any "import ray" / "from ray..." now raises ImportError

import importlib
import io
import pkgutil
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

import operators

SOURCES = {"operators.shard_source", "operators.pair_source"}
names = sorted(m.name for m in pkgutil.walk_packages(operators.__path__, "operators.") if m.name not in SOURCES)
for name in names:
    importlib.import_module(name)
expected = {"operators.contracts", "operators.decode", "operators.embedders", "operators.embedding_cache",
            "operators.faiss_shards", "operators.fusion", "operators.index_ops", "operators.parts",
            "operators.rerank_ops", "operators.search_ops", "operators.shards"}
assert expected <= set(names), sorted(expected - set(names))
# The blocker works: a datasource module does need Ray.
for name in SOURCES:
    try:
        importlib.import_module(name)
    except ImportError:
        pass
    else:
        raise AssertionError(f"{name} imported with Ray blocked")

from operators import contracts as C
from operators import fusion
from operators.decode import decode_image
from operators.rerank_ops import DECODED, DecodeDocs, docs_from_pairs, explode, select_per_query
from operators.search_ops import query_vectors
from operators.shards import plan_shards, read_rows
from operators.storage import Storage

buf = io.BytesIO()
Image.new("RGB", (4, 3), (200, 10, 10)).save(buf, "PNG")
png = buf.getvalue()

# decode
img = decode_image(png, C.DEFAULT_MAX_IMAGE_PIXELS, C.ALLOWED_FORMATS)
assert (img.mode, img.size) == ("RGB", (4, 3))
try:
    decode_image(b"", C.DEFAULT_MAX_IMAGE_PIXELS, C.ALLOWED_FORMATS)
except C.RejectError as e:
    assert e.error_type == C.EMPTY_IMAGE
else:
    raise AssertionError("empty image decoded")

# shard reader: contract check, duplicate ids, null payloads
with tempfile.TemporaryDirectory() as d:
    uri = f"{d}/corpus.parquet"
    pq.write_table(pa.table({"doc_id": ["a", "a", "b"], "image": [png, png, None], "text": ["x", "y", "z"]},
                            schema=C.CORPUS_IMAGE_BYTES), uri)
    (plan,) = plan_shards([uri], C.CORPUS, Storage())
    (rows,) = list(read_rows(plan, "k", [0], 0, "doc_id", None, 16))
    assert rows.column(C.ERR_TYPE).to_pylist() == ["", C.DUPLICATE_ID, C.NULL_PAYLOAD]
    assert rows.column(C.ROW).to_pylist() == [0, 1, 2]

# search: query vectors with a wrong dimension and a NaN
err_type = np.array(["", "", ""], object)
err_msg = np.array(["", "", ""], object)
query_vectors(pa.array([[1.0, 0.0], [1.0], [float("nan"), 0.0]]), 2, err_type, err_msg)
assert err_type.tolist() == ["", C.BAD_DIMENSION, C.NON_FINITE]

# rerank: pairs -> doc blocks -> decode once per doc -> pairs; fusion + selection -> the results contract
pairs = pa.table({"query_id": ["q1", "q2", "q1"], "query_text": ["t1", "t2", "t1"], "doc_id": ["d0", "d0", "d1"],
                  "rank": pa.array([1, 1, 2], pa.int32()), "retrieval_score": pa.array([0.9, 0.8, 0.5], pa.float32()),
                  "doc_shard": ["s"] * 3, "doc_row": pa.array([0, 0, 1], pa.int64()),
                  "doc_image": pa.array([png, png, b"not an image"], pa.binary()),
                  "doc_image_uri": pa.nulls(3, pa.string()), "doc_caption": pa.nulls(3, pa.string())})
docs = DecodeDocs(True, C.DEFAULT_MAX_IMAGE_PIXELS, C.ALLOWED_FORMATS)(docs_from_pairs(pairs))
assert docs.num_rows == 2 and sum(docs.column(DECODED).to_pylist()) == 2
assert docs.column(C.ERR_TYPE).to_pylist() == ["", C.UNDECODABLE]
flat = explode(docs)
assert sorted(flat[C.ID].tolist()) == ["q1", "q1", "q2"]
scored = pa.table({"query_id": ["q1", "q1"], "doc_id": ["d0", "d1"],
                   "retrieval_score": pa.array([0.9, 0.5], pa.float32()),
                   "rerank_score": pa.array([0.1, 0.7], pa.float32())})
res = select_per_query(scored, {"method": "none"}, {"mode": "top_n", "top_n": 1}, "r", "run")
assert res.schema == C.RESULTS and res.column("doc_id").to_pylist() == ["d1"]
assert fusion.select(fusion.fuse(np.array([0.9, 0.5]), np.array([0.1, 0.7]), ["d0", "d1"]), ["d0", "d1"]).tolist() == [1, 0]

assert sys.modules["ray"] is None
print("ok")
'''


def test_udf_modules_import_and_run_without_ray() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
