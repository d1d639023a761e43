"""The GPU readiness check's CPU mode (``benchmarks/gpu_check.py --device cpu --small``) and the operator
modules importing without Ray (the GPU device has no Ray); both in subprocesses where ``ray`` cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
RAY_SOURCES = {"operators.shard_source", "operators.pair_source"}  # the only modules that need Ray

# Prepended to each subprocess: any import of ray (or a submodule) fails.
BLOCK_RAY = """
import sys

class _NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"ray is not importable in this test ({name})")
        return None

sys.meta_path.insert(0, _NoRay())
"""


def _run(code: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", BLOCK_RAY + code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_operator_modules_import_without_ray() -> None:
    """Every operators module but the two Ray Data sources imports with ray unimportable; those two fail
    (so the blocker works and they stay the only Ray-dependent ones)."""
    r = _run("""
import importlib, pkgutil
import operators
names = sorted(m.name for m in pkgutil.walk_packages(operators.__path__, "operators."))
for name in names:
    try:
        importlib.import_module(name)
        print("ok", name)
    except ImportError as e:
        print("blocked", name, e)
""", timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    status = {line.split()[1]: line.split()[0] for line in r.stdout.splitlines()}
    assert {"operators.embedders", "operators.decode", "operators.rerank_ops", "operators.search_ops",
            "operators.faiss_shards", "operators.shards", "operators.rerankers.vlm_yesno"} <= set(status)
    assert {n for n, s in status.items() if s == "blocked"} == RAY_SOURCES, r.stdout


def test_gpu_check_cpu_small_mode(tmp_path: Path) -> None:
    """The whole check in its CPU mode: every row present, no errors, positive rates, the UDFs computing what
    the raw loops compute, exact search, and no low-precision figures (auto is fp32 on CPU)."""
    out_md, out_json = tmp_path / "table.md", tmp_path / "table.json"
    argv = [str(SCRIPT), "--device", "cpu", "--small", "--out", str(out_md), "--json", str(out_json),
            "--workdir", str(tmp_path / "work")]
    r = _run(f"""
import runpy, sys
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
""", timeout=400)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    data = json.loads(out_json.read_text())
    assert data["device"] == "cpu" and data["precision"] == "fp32"
    rows = data["rows"]
    assert {row["check"] for row in rows} == {
        "DecodeImages", "ImageEmbedder", "TextEmbedder", "ImageEmbedder fed", "RerankPairs clip",
        "RerankPairs blip_itm", "RerankPairs vlm_yesno", "RerankPairs vlm_yesno shared", "ShardSearcher+SearchRouter"}
    assert sorted(row["batch"] for row in rows if row["check"] == "ImageEmbedder") == [16, 32]
    for row in rows:
        assert row["error"] is None, row
        assert row["udf_rate"] > 0 and row["raw_rate"] > 0, row
        assert row["ratio"] == row["udf_rate"] / row["raw_rate"]
        assert row["precision"] == "fp32"
        assert row["cos_min"] is None and row["score_max_abs"] is None, row  # CPU: nothing lower than fp32
        if row["check"] == "ShardSearcher+SearchRouter":
            assert row["recall"] >= 0.99, row  # Flat shards + exact merge vs exact torch top-k
            assert row["udf_vs_raw"] <= 0.01, row  # share of queries whose ids differ from one faiss index
        elif row["check"] != "ImageEmbedder fed":
            assert row["udf_vs_raw"] is not None and row["udf_vs_raw"] < 1e-4, row
    table = out_md.read_text()
    assert table.count("\n| ") == len(rows) + 1  # header + one line per row
    for row in rows:
        assert f"| {row['check']} |" in table
