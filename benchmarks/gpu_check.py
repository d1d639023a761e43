"""GPU readiness check: the project's own operator UDFs, without Ray, each against a raw model loop in one process.

    bash benchmarks/gpu_check.sh                                   # on the device (installs the carried wheels)
    python benchmarks/gpu_check.py --device cpu --small            # here: the same code paths, tiny models (~1 min)
    python benchmarks/gpu_check.py --device cuda --budget-s 450 --out table.md --json table.json
    python benchmarks/gpu_check.py --device cuda --precision fp16 --only clip,blip_itm,vlm_yesno   # fp16 vs fp32

Every row constructs the class the pipeline's Ray stage constructs (``ImageEmbedder`` / ``TextEmbedder``
with ``precision: auto``, ``DecodeImages``, ``RerankPairs`` over a ``RerankerSpec``, ``ShardSearcher`` over
verified shard files and ``SearchRouter``'s merge), calls it on batches shaped as Ray Data hands them over,
and times it against a plain loop over the *same* model object on the same device (warm-up first, then
alternating UDF / raw repetitions; the best of each is kept). Columns:

* ``UDF`` / ``raw`` / ``ratio``: items per second and UDF / raw.
* ``UDF = raw``: max |difference| of the two outputs (same weights, same precision): the UDF computes
  what the plain loop computes.
* ``low prec. vs fp32``: embeddings: min / mean cosine of the ``auto`` precision's (bf16 or fp16 on GPU)
  embeddings against an fp32 build of the same UDF; rerankers: max |score difference| and Spearman rho;
  search: recall@k of the sharded UDF search against an exact torch matmul top-k on the device.
  On CPU ``auto`` is fp32 and the column is empty.
* ``peak MiB``: ``torch.cuda.max_memory_allocated`` during the UDF's timed run (GPU only).

Models have random weights of the stated sizes (open_clip ``create_model(name, pretrained=None)`` through the
project's ``resolve_model``/``build_model``; a BLIP-base-shaped ``BlipForImageTextRetrieval`` and a
Qwen2-VL-2B-shaped ``Qwen2VLForConditionalGeneration`` saved as safetensors and loaded by the backends the
real way); ``--small`` uses the tiny test models (``mmr-tiny``, ``tests/tiny_hf.py``, ``tests/tiny_vlm.py``).
Images are the synthetic sample (``pipelines.sample.make_sample``), vectors ``bench_search.make_vectors``.
A row that raises is reported with its error and the check exits 1; rows past ``--budget-s`` are skipped.
Nothing here imports Ray.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from _common import fmt  # noqa: E402
from bench_search import make_vectors  # noqa: E402

log = logging.getLogger("gpu_check")


@dataclass(frozen=True)
class Profile:
    """Sizes of one mode: realistic models on the GPU, tiny ones for ``--small``."""

    embed: tuple[tuple[str, tuple[int, ...]], ...]  # (open_clip model, batch sizes)
    fp16_model: str | None  # an extra fp16 embedder row (GPU only)
    fed_model: str
    fed_batch: int
    fed_images: int
    text_batch: int
    clip_rerank_model: str
    rerank_batch: dict[str, int]
    image_size: int  # sample images (px)
    docs: int  # distinct sample images
    batches: int  # timed batches per repetition
    reps: int  # alternating UDF / raw repetitions (the best of each is kept)
    search: tuple[int, int, int, int, int]  # docs, dim, queries, k, shards


GPU = Profile(embed=(("ViT-B-32", (256, 1024)), ("ViT-L-14", (256,))), fp16_model="ViT-B-32",
              fed_model="ViT-B-32", fed_batch=512, fed_images=8192, text_batch=1024, clip_rerank_model="ViT-L-14",
              rerank_batch={"clip": 128, "blip_itm": 64, "vlm_yesno": 16}, image_size=384, docs=512, batches=6, reps=2,
              search=(500_000, 512, 4096, 100, 2))
SMALL = Profile(embed=(("mmr-tiny", (16, 32)),), fp16_model=None, fed_model="mmr-tiny", fed_batch=32,
                fed_images=64, text_batch=32, clip_rerank_model="mmr-tiny",
                rerank_batch={"clip": 16, "blip_itm": 8, "vlm_yesno": 4}, image_size=64, docs=32, batches=2, reps=1,
                search=(20_000, 64, 256, 20, 2))

COLUMNS = ("check", "setup", "batch", "precision", "UDF", "raw", "unit", "ratio", "UDF = raw",
           "low prec. vs fp32", "peak MiB", "s", "notes")


@dataclass
class Row:
    check: str
    setup: str
    batch: int | None = None
    precision: str = ""
    udf_rate: float | None = None
    raw_rate: float | None = None
    unit: str = ""
    udf_vs_raw: float | None = None  # max |UDF output - raw output|
    cos_min: float | None = None  # embeddings, low precision vs fp32
    cos_mean: float | None = None
    score_max_abs: float | None = None  # rerankers, low precision vs fp32
    score_rho: float | None = None
    recall: float | None = None  # search vs exact top-k
    peak_mib: float | None = None
    seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        return self.udf_rate / self.raw_rate if self.udf_rate and self.raw_rate else None

    def cells(self) -> list[str]:
        if self.cos_min is not None:
            lowp = f"cos min {self.cos_min:.5f} / mean {self.cos_mean:.5f}"
        elif self.score_max_abs is not None:
            lowp = f"max abs {self.score_max_abs:.2e}, rho {fmt(self.score_rho, 4)}"
        elif self.recall is not None:
            lowp = f"recall@k {self.recall:.4f}"
        else:
            lowp = ""
        notes = "; ".join(self.notes + ([f"ERROR {self.error}"] if self.error else []))
        return [self.check, self.setup, fmt(self.batch), self.precision, fmt(self.udf_rate), fmt(self.raw_rate),
                self.unit, fmt(self.ratio, 3), "" if self.udf_vs_raw is None else f"{self.udf_vs_raw:.1e}", lowp,
                fmt(self.peak_mib, 0), fmt(self.seconds), notes]


# --- shared helpers ---------------------------------------------------------------------------------------


class Ctx:
    """What every check needs: device, precision, profile, sample data, a scratch dir, the decode pool."""

    def __init__(self, device: str, profile: Profile, work: Path, workers: int, precision: str = "auto") -> None:
        import pyarrow.parquet as pq

        from operators.models import resolve_precision
        from pipelines.sample import make_sample

        self.device, self.profile, self.work, self.workers = device, profile, work, workers
        self.requested = precision  # what every UDF is given, as the config's `precision` field
        self.precision = resolve_precision(precision, device)
        self.lowp = self.precision != "fp32"
        info = make_sample(str(work / "sample"), docs=profile.docs, queries=4, shards=1, seed=0,
                           image_size=profile.image_size)
        corpus = pq.read_table(info.shard_uris[0].split("://", 1)[-1], columns=["doc_id", "image", "text"])
        self.images: list[bytes] = corpus.column("image").to_pylist()
        self.captions: list[str] = corpus.column("text").to_pylist()

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float | None:
        if self.device != "cuda":
            return None
        import torch

        return torch.cuda.max_memory_allocated() / 2**20

    def free(self) -> None:
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()


def _meta(n: int, key: str = "s0", start: int = 0) -> dict[str, Any]:
    """The bookkeeping columns every batch carries (``operators.contracts``), all rows ok."""
    import numpy as np

    from operators.contracts import ERR_MSG, ERR_TYPE, ID, ROW, SHARD, SOURCE

    return {ID: np.array([f"r{start + i}" for i in range(n)], dtype=object),
            ROW: np.arange(start, start + n, dtype=np.int64),
            SHARD: np.array([key] * n, dtype=object), SOURCE: np.array(["gpu-check"] * n, dtype=object),
            ERR_TYPE: np.array([""] * n, dtype=object), ERR_MSG: np.array([""] * n, dtype=object)}


def _rates(ctx: Ctx, n_items: int, udf: Callable[[int], Any], raw: Callable[[int], Any]
           ) -> tuple[float, float, float | None]:
    """(UDF items/s, raw items/s, GPU peak MiB of the UDF) over ``ctx.profile.batches`` calls of each,
    after one warm-up call each; repetitions alternate UDF / raw and the best of each is kept."""
    nb = ctx.profile.batches
    udf(0)
    raw(0)
    best_u = best_r = 0.0
    peak = None
    for _ in range(ctx.profile.reps):
        ctx.reset_peak()
        t0 = time.perf_counter()
        for b in range(nb):
            udf(b)
        ctx.sync()
        best_u = max(best_u, nb * n_items / (time.perf_counter() - t0))
        got = ctx.peak_mib()
        peak = None if got is None else max(peak or 0.0, got)
        t0 = time.perf_counter()
        for b in range(nb):
            raw(b)
        ctx.sync()
        best_r = max(best_r, nb * n_items / (time.perf_counter() - t0))
    return best_u, best_r, peak


def _spearman(a: Any, b: Any) -> float | None:
    import numpy as np

    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if np.std(ra) == 0 or np.std(rb) == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _cosines(a: Any, b: Any) -> tuple[float, float]:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    c = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(c.min()), float(c.mean())


def _pil(data: bytes) -> Any:
    """The plain loop's decode: what a user would write, no checks."""
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


_TRANSFORMS: dict[Any, Any] = {}


def _plain_pixels(images: list[bytes], pp: Any) -> Any:
    """Plain decode + open_clip's transform of a chunk (runs in the decode pool too)."""
    import numpy as np

    from operators.models import image_transform

    tf = _TRANSFORMS.get(pp) or _TRANSFORMS.setdefault(pp, image_transform(pp))
    return np.stack([tf(_pil(d)).numpy() for d in images])


def _pool_init() -> None:
    import torch

    torch.set_num_threads(1)  # one decode per process, as Ray's CPU tasks run (OMP_NUM_THREADS=1)


def _cycle(ctx: Ctx, n: int, offset: int = 0) -> list[int]:
    return [(offset + i) % len(ctx.images) for i in range(n)]


# --- embedders ----------------------------------------------------------------------------------------------


def _image_table(ctx: Ctx, idx: list[int]) -> Any:
    """A read block as ``ShardSource`` yields it (id, image, row, shard, source, error columns)."""
    import pyarrow as pa

    return pa.table({k: pa.array(v.tolist()) for k, v in _meta(len(idx)).items()}
                    | {"image": pa.array([ctx.images[i] for i in idx], pa.binary())})


def check_decode(ctx: Ctx) -> list[Row]:
    """``DecodeImages`` (safe decode + preprocess) in this process vs the plain PIL + transform loop."""
    import numpy as np

    from operators.embedders import PIXELS, DecodeImages
    from operators.models import ModelSpec, resolve_model

    pp = resolve_model(ModelSpec(name=ctx.profile.fed_model)).preprocess
    dec = DecodeImages(pp, 89_478_485, ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"))
    n = min(64, len(ctx.images))
    tables = [_image_table(ctx, _cycle(ctx, n, b * n)) for b in range(ctx.profile.batches)]
    raws = [[ctx.images[i] for i in _cycle(ctx, n, b * n)] for b in range(ctx.profile.batches)]
    u, r, _ = _rates(ctx, n, lambda b: dec(tables[b]), lambda b: _plain_pixels(raws[b], pp))
    diff = float(np.abs(dec(tables[0])[PIXELS] - _plain_pixels(raws[0], pp)).max())
    return [Row("DecodeImages", f"{ctx.profile.image_size}px JPEG/PNG -> {pp.size}px, 1 process", n, "fp32",
                u, r, "img/s", udf_vs_raw=diff)]


def check_image_embedder(ctx: Ctx, name: str, batches: tuple[int, ...], precision: str | None = None) -> list[Row]:
    import numpy as np
    import torch

    from operators.embedders import EMBEDDING, PIXELS, DecodeImages, ImageEmbedder
    from operators.models import ModelSpec, resolve_model
    from operators.rerankers.base import torch_dtype

    rm = resolve_model(ModelSpec(name=name, pretrained=None, seed=0))
    t0 = time.perf_counter()
    emb = ImageEmbedder(rm, device=ctx.device, precision=precision or ctx.requested)
    load_s = time.perf_counter() - t0
    ref = ImageEmbedder(rm, device=ctx.device, precision="fp32") if emb.precision != "fp32" else None
    dec = DecodeImages(rm.preprocess, 89_478_485, ("JPEG", "PNG"))
    base = dec(_image_table(ctx, _cycle(ctx, len(ctx.images))))[PIXELS]  # the distinct images, decoded once
    rows = []
    for bs in batches:
        # Two different batches of pixels (cycled sample images), as DecodeImages tasks hand them over.
        pix = [np.ascontiguousarray(base[_cycle(ctx, bs, k * bs)]) for k in range(2)]
        batch = [_meta(bs) | {PIXELS: p} for p in pix]

        def raw(b: int, pix: list[Any] = pix) -> Any:
            with torch.inference_mode():
                x = torch.from_numpy(pix[b % 2]).to(ctx.device)
                if emb.autocast:
                    x = x.to(torch_dtype(emb.precision))
                return torch.nn.functional.normalize(emb.model.encode_image(x).float(), dim=-1).cpu().numpy()

        u, r, peak = _rates(ctx, bs, lambda b, batch=batch: emb(batch[b % 2]), raw)
        out = np.stack(emb(batch[0])[EMBEDDING])
        row = Row("ImageEmbedder", f"{name} random", bs, emb.precision, u, r, "img/s",
                  udf_vs_raw=float(np.abs(out - raw(0)).max()), peak_mib=peak)
        if ref is not None:
            row.cos_min, row.cos_mean = _cosines(out, np.stack(ref(batch[0])[EMBEDDING]))
        row.notes.append(f"model build {load_s:.1f}s")
        rows.append(row)
    return rows


def check_fed(ctx: Ctx, pool: Any) -> list[Row]:
    """``DecodeImages`` in ``ctx.workers`` CPU processes feeding ``ImageEmbedder`` (the GPU layout:
    decode tasks, then the actor), against plain decode processes feeding the raw loop."""
    import numpy as np
    import torch

    from operators.embedders import EMBEDDING, PIXELS, DecodeImages, ImageEmbedder
    from operators.models import ModelSpec, resolve_model
    from operators.rerankers.base import torch_dtype

    p = ctx.profile
    rm = resolve_model(ModelSpec(name=p.fed_model, pretrained=None, seed=0))
    emb = ImageEmbedder(rm, device=ctx.device, precision=ctx.requested)
    dec = DecodeImages(rm.preprocess, 89_478_485, ("JPEG", "PNG"))
    chunk = max(8, p.fed_batch // 8)
    n = p.fed_images // p.fed_batch * p.fed_batch
    tables = [_image_table(ctx, _cycle(ctx, chunk, k * chunk)) for k in range(n // chunk)]
    raws = [[ctx.images[i] for i in _cycle(ctx, chunk, k * chunk)] for k in range(n // chunk)]

    def batches(parts: Iterator[Any], key: Callable[[Any], Any]) -> Iterator[list[Any]]:
        buf: list[Any] = []
        for part in parts:
            buf.append(part)
            if sum(len(key(x)) for x in buf) >= p.fed_batch:
                yield buf
                buf = []
        if buf:
            yield buf

    def udf() -> int:
        done = 0
        for parts in batches(pool.imap(dec, tables), lambda d: d[PIXELS]):
            batch = {c: np.concatenate([d[c] for d in parts]) for c in parts[0]}
            done += len(emb(batch)[EMBEDDING])
        return done

    def raw() -> int:
        done = 0
        for parts in batches(pool.imap(_PlainChunk(rm.preprocess), raws), lambda a: a):
            with torch.inference_mode():
                x = torch.from_numpy(np.concatenate(parts)).to(ctx.device)
                if emb.autocast:
                    x = x.to(torch_dtype(emb.precision))
                done += len(torch.nn.functional.normalize(emb.model.encode_image(x).float(), dim=-1).cpu())
        return done

    def decode_only() -> int:
        return sum(len(d[PIXELS]) for d in pool.imap(dec, tables))

    def timed(fn: Callable[[], int]) -> float:
        t0 = time.perf_counter()
        done = fn()
        if done != n:
            raise RuntimeError(f"{fn.__name__}: {done} of {n} images came back")
        return n / (time.perf_counter() - t0)

    decode_only()  # warm: the pool's imports, the model's first calls
    udf()
    best_u = best_r = 0.0
    peak = None
    for _ in range(p.reps):
        ctx.reset_peak()
        best_u = max(best_u, timed(udf))
        peak = ctx.peak_mib()
        best_r = max(best_r, timed(raw))
    best_d = timed(decode_only)
    row = Row("ImageEmbedder fed", f"{p.fed_model}, {ctx.workers} decode procs, {n} images", p.fed_batch,
              emb.precision, best_u, best_r, "img/s", peak_mib=peak)
    row.notes.append(f"decode procs alone {best_d:.1f} img/s")
    return [row]


@dataclass(frozen=True)
class _PlainChunk:
    """Picklable plain-decode callable for the pool (the raw side of :func:`check_fed`)."""

    pp: Any

    def __call__(self, images: list[bytes]) -> Any:
        return _plain_pixels(images, self.pp)


def check_text_embedder(ctx: Ctx) -> list[Row]:
    import numpy as np
    import torch

    from operators.embedders import EMBEDDING, TextEmbedder
    from operators.models import ModelSpec, resolve_model

    name, bs = ctx.profile.embed[0][0], ctx.profile.text_batch
    rm = resolve_model(ModelSpec(name=name, pretrained=None, seed=0))
    emb = TextEmbedder(rm, device=ctx.device, precision=ctx.requested)
    ref = TextEmbedder(rm, device=ctx.device, precision="fp32") if emb.precision != "fp32" else None
    texts = [[f"{ctx.captions[i]} number {k * bs + j}" for j, i in enumerate(_cycle(ctx, bs, k * bs))]
             for k in range(2)]
    batch = [_meta(bs) | {"text": np.array(t, dtype=object)} for t in texts]

    def raw(b: int) -> Any:
        with torch.inference_mode():
            tok = emb.tokenizer(texts[b % 2]).to(ctx.device)
            return torch.nn.functional.normalize(emb.model.encode_text(tok).float(), dim=-1).cpu().numpy()

    u, r, peak = _rates(ctx, bs, lambda b: emb(batch[b % 2]), raw)
    out = np.stack(emb(batch[0])[EMBEDDING])
    row = Row("TextEmbedder", f"{name} random", bs, emb.precision, u, r, "queries/s",
              udf_vs_raw=float(np.abs(out - raw(0)).max()), peak_mib=peak)
    if ref is not None:
        row.cos_min, row.cos_mean = _cosines(out, np.stack(ref(batch[0])[EMBEDDING]))
    return [row]


# --- rerankers ----------------------------------------------------------------------------------------------


def _save_blip(ctx: Ctx, dest: Path) -> Path:
    """BLIP-base-shaped ITM model (ViT-B/16 at 384 px + BERT-base text, ~224M params) or the tiny test one."""
    from tests import tiny_hf

    if ctx.profile is SMALL:
        return tiny_hf.save_tiny_blip(dest)
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    tok = tiny_hf.bert_tokenizer(blip=True)
    cfg = BlipConfig(text_config=dict(vocab_size=max(30524, len(tok)), bos_token_id=tok.bos_token_id,
                                      sep_token_id=tok.sep_token_id, pad_token_id=0), vision_config=dict())
    BlipForImageTextRetrieval(cfg).save_pretrained(dest)
    size = cfg.vision_config.image_size
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": size, "width": size}), tokenizer=tok
                  ).save_pretrained(dest)
    return dest


def _save_vlm(ctx: Ctx, dest: Path) -> Path:
    """A Qwen2-VL-2B-shaped model (2.2B params; built on the device, saved in bf16) or the tiny test one.
    The tokenizer is the tiny word-level one (the shapes, not the vocabulary, set the cost); images are
    bounded to 448x448 px (256 image tokens)."""
    from tests import tiny_vlm

    if ctx.profile is SMALL:
        return tiny_vlm.save_tiny_vlm(dest)
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=224 * 224, max_pixels=448 * 448),
                            tokenizer=tiny_vlm.build_tokenizer(), video_processor=Qwen2VLVideoProcessor(),
                            chat_template=tiny_vlm.QWEN2_VL_CHAT_TEMPLATE)
    v = proc.tokenizer.get_vocab()
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                         tie_word_embeddings=True, bos_token_id=v["<|endoftext|>"], eos_token_id=v["<|im_end|>"],
                         pad_token_id=v["<|endoftext|>"]),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=v["<|image_pad|>"], video_token_id=v["<|video_pad|>"],
        vision_start_token_id=v["<|vision_start|>"], vision_end_token_id=v["<|vision_end|>"], tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = Qwen2VLForConditionalGeneration(cfg)
    model.to(torch.bfloat16).save_pretrained(dest)
    proc.save_pretrained(dest)
    del model
    ctx.free()
    return dest


def _pairs_batch(ctx: Ctx, n: int, offset: int, per_doc: int = 1) -> dict[str, Any]:
    """n pairs over n / per_doc distinct docs, each pair with its own query text (another doc's caption), the
    doc's image bytes and caption (the raw loop's input; :func:`_doc_block` turns it into what ``PairsSource``
    hands ``RerankPairs``). ``per_doc`` > 1: each doc is retrieved by that many queries, as docs recur across
    queries in a night's candidates (what prefix sharing saves on)."""
    import numpy as np

    from operators.contracts import ID

    docs = [d for d in _cycle(ctx, -(-n // per_doc), offset // per_doc) for _ in range(per_doc)][:n]
    qi = [(7 * d + 3 + 5 * (i % per_doc)) % len(ctx.captions) for i, d in enumerate(docs)]
    m = _meta(n, "cand-0")
    m[ID] = np.array([f"q{q}" for q in qi], dtype=object)
    return m | {
        "doc_id": np.array([f"d{d}" for d in docs], dtype=object), "rank": np.arange(1, n + 1, dtype=np.int32),
        "retrieval_score": np.linspace(1, 0, n, dtype=np.float32), "doc_shard": np.array(["s0"] * n, dtype=object),
        "doc_row": np.array(docs, dtype=np.int64), "query_text": np.array([ctx.captions[q] for q in qi], dtype=object),
        "doc_image": np.array([ctx.images[d] for d in docs], dtype=object),
        "doc_image_uri": np.array([None] * n, dtype=object),
        "doc_caption": np.array([ctx.captions[d] for d in docs], dtype=object),
    }


def _doc_block(pairs: dict[str, Any]) -> Any:
    """The pairs as the block of candidate docs the reranker actor takes."""
    import pyarrow as pa

    from operators.contracts import ID
    from operators.rerank_ops import docs_from_pairs

    cols = ("doc_id", "rank", "retrieval_score", "doc_shard", "doc_row", "query_text", "doc_image",
            "doc_image_uri", "doc_caption")
    return docs_from_pairs(pa.table({"query_id": list(pairs[ID]), **{c: list(pairs[c]) for c in cols}}))


def _udf(rr: Any, block: Any) -> dict[str, Any]:
    """``RerankPairs`` on a doc block, its output back in the pairs' order (it comes out doc by doc)."""
    import numpy as np

    from operators.contracts import ROW

    out = rr(block)
    order = np.argsort(np.asarray(out[ROW]))
    return {k: np.asarray(v)[order] for k, v in out.items()}


def _raw_scorer(backend: str, rr: Any, device: str) -> Callable[[dict[str, Any]], Any]:
    """The plain loop for one backend over the UDF's own model objects: PIL decode, processor, forward."""
    import numpy as np
    import torch

    from operators.rerankers.base import torch_dtype

    b = rr.backend

    def clip(batch: dict[str, Any]) -> Any:
        x = torch.stack([b.transform(_pil(d)) for d in batch["doc_image"]]).to(device)
        if device == "cuda" and b.precision in ("fp16", "bf16"):
            x = x.to(torch_dtype(b.precision))
        with torch.inference_mode():
            t = torch.nn.functional.normalize(b.model.encode_text(b.tokenizer(list(batch["query_text"])).to(device))
                                              .float(), dim=-1)
            v = torch.nn.functional.normalize(b.model.encode_image(x).float(), dim=-1)
            return (v * t).sum(-1).cpu().numpy()

    def blip(batch: dict[str, Any]) -> Any:
        enc = b.processor(images=[_pil(d) for d in batch["doc_image"]], text=list(batch["query_text"]),
                          padding=True, truncation=True, max_length=b.max_length, return_tensors="pt")
        with torch.inference_mode():
            out = b.model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                          pixel_values=enc["pixel_values"].to(device, dtype=b.dtype), use_itm_head=True)
            return torch.softmax(out.itm_score.float(), dim=-1)[:, 1].cpu().numpy()

    def vlm(batch: dict[str, Any]) -> Any:
        texts = [b.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": rr.spec.prompt.format(query=q, caption=c)}]}],
            add_generation_prompt=True, tokenize=False) for q, c in zip(batch["query_text"], batch["doc_caption"],
                                                                      strict=True)]
        enc = b.processor(text=texts, images=[_pil(d) for d in batch["doc_image"]], padding=True, return_tensors="pt")
        inputs = {k: v.to(device, dtype=b.model.dtype) if v.is_floating_point() else v.to(device)
                  for k, v in enc.items()}
        with torch.inference_mode():
            logits = b.model(**inputs, logits_to_keep=1).logits[:, -1]
            return torch.softmax(logits[:, [b.pos_id, b.neg_id]].float(), dim=-1)[:, 0].cpu().numpy()

    fn = {"clip": clip, "blip_itm": blip, "vlm_yesno": vlm}[backend]
    return lambda batch: np.asarray(fn(batch), dtype=np.float32)


def check_reranker(ctx: Ctx, backend: str) -> list[Row]:
    import numpy as np

    from operators.contracts import ERR_TYPE
    from operators.models import ModelSpec, resolve_model
    from operators.rerank_ops import RerankPairs
    from operators.rerankers.base import RerankerSpec

    t0 = time.perf_counter()
    if backend == "clip":
        name = ctx.profile.clip_rerank_model
        spec = RerankerSpec(backend="clip", clip_model=resolve_model(ModelSpec(name=name, pretrained=None, seed=1)))
        setup = f"{name} random"
    else:
        dest = ctx.work / backend
        (_save_blip if backend == "blip_itm" else _save_vlm)(ctx, dest)
        spec = RerankerSpec(backend=backend, model=str(dest), max_length=64 if backend == "blip_itm" else 512)
        setup = {"blip_itm": "BLIP-base-shaped", "vlm_yesno": "Qwen2-VL-2B-shaped"}[backend]
        if ctx.profile is SMALL:
            setup = f"tiny {backend}"
    made_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    bs = ctx.profile.rerank_batch[backend]
    rr = RerankPairs(spec, device=ctx.device, precision=ctx.requested, batch_size=bs)
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in rr.backend.model.parameters())
    batches = [_pairs_batch(ctx, bs, k * bs) for k in range(2)]
    blocks = [_doc_block(b) for b in batches]
    raw = _raw_scorer(backend, rr, ctx.device)
    u, r, peak = _rates(ctx, bs, lambda b: rr(blocks[b % 2]), lambda b: raw(batches[b % 2]))
    out = _udf(rr, blocks[0])
    if any(out[ERR_TYPE]):
        raise RuntimeError(f"{backend}: pairs rejected: {sorted(set(out[ERR_TYPE]) - {''})}")
    scores = np.asarray(out["rerank_score"], np.float32)
    row = Row(f"RerankPairs {backend}", f"{setup} ({params / 1e6:.3g}M params)", bs, rr.backend.precision, u, r,
              "pairs/s", udf_vs_raw=float(np.abs(scores - raw(batches[0])).max()), peak_mib=peak)
    row.notes.append(f"model made {made_s:.1f}s, loaded {load_s:.1f}s; scores {scores.min():.3f}..{scores.max():.3f}")
    if ctx.lowp:
        low_scores = np.concatenate([_udf(rr, b)["rerank_score"] for b in blocks])
        ref = RerankPairs(spec, device=ctx.device, precision="fp32", batch_size=bs)
        ref_scores = np.concatenate([_udf(ref, b)["rerank_score"] for b in blocks])
        row.score_max_abs = float(np.abs(low_scores - ref_scores).max())
        row.score_rho = _spearman(low_scores, ref_scores)
    return [row]



SHARED_PER_DOC = 4  # queries per doc in the prefix-sharing row (the benchmark workload has ~6 on average)


def check_vlm_shared(ctx: Ctx) -> list[Row]:
    """vlm_yesno with ``prefix_sharing: on`` (each doc's image and prompt prefix once, its queries as suffixes)
    against the raw per-pair loop over the same pairs, SHARED_PER_DOC queries per doc; the stage's per-pair path
    (``off``) is timed too and noted."""
    import numpy as np

    from operators.rerank_ops import RerankPairs
    from operators.rerankers.base import RerankerSpec

    dest = ctx.work / "vlm_yesno"
    t0 = time.perf_counter()
    if not (dest / "config.json").is_file():  # the vlm_yesno row saved it already when it ran
        _save_vlm(ctx, dest)
    made_s = time.perf_counter() - t0
    bs = ctx.profile.rerank_batch["vlm_yesno"]
    spec = RerankerSpec(backend="vlm_yesno", model=str(dest), max_length=512, prefix_sharing="on")
    rr = RerankPairs(spec, device=ctx.device, precision=ctx.requested, batch_size=bs)
    batches = [_pairs_batch(ctx, bs, k * bs, SHARED_PER_DOC) for k in range(2)]
    blocks = [_doc_block(b) for b in batches]
    raw = _raw_scorer("vlm_yesno", rr, ctx.device)
    u, r, peak = _rates(ctx, bs, lambda b: rr(blocks[b % 2]), lambda b: raw(batches[b % 2]))
    shared = np.asarray(_udf(rr, blocks[0])["rerank_score"], np.float32)
    params = sum(p.numel() for p in rr.backend.model.parameters())
    off = RerankPairs(RerankerSpec(backend="vlm_yesno", model=str(dest), max_length=512, prefix_sharing="off"),
                      device=ctx.device, precision=ctx.requested, batch_size=bs)
    off_rate, _, _ = _rates(ctx, bs, lambda b: off(blocks[b % 2]), lambda b: None)  # a second copy of the weights
    per_pair = np.asarray(_udf(off, blocks[0])["rerank_score"], np.float32)
    setup = "tiny vlm_yesno" if ctx.profile is SMALL else "Qwen2-VL-2B-shaped"
    row = Row("RerankPairs vlm_yesno shared", f"{setup} ({params / 1e6:.3g}M params), {SHARED_PER_DOC} queries/doc",
              bs, off.backend.precision, u, r, "pairs/s", udf_vs_raw=float(np.abs(shared - raw(batches[0])).max()),
              peak_mib=peak)
    row.notes.append(f"prefix_sharing off: {off_rate:.1f} pairs/s ({u / off_rate:.2f}x on/off); max |on - off| "
                     f"{float(np.abs(shared - per_pair).max()):.2e}; model made {made_s:.1f}s")
    return [row]

# --- search -------------------------------------------------------------------------------------------------


def _write_shards(work: Path, vectors: Any, shards: int) -> list[dict[str, Any]]:
    """Flat index shards + id tables as ``pipelines.index`` writes them, with their manifest entries."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from operators import faiss_shards as F

    dim = vectors.shape[1]
    trained = F.train("Flat", dim, np.zeros((0, dim), np.float32), 0)
    entries, offset = [], 0
    for s, part in enumerate(np.array_split(np.arange(len(vectors)), shards)):
        data = F.build_shard(trained, vectors[part])
        ids = pa.table({"doc_id": pa.array([f"d{i}" for i in part], pa.string()),
                        "shard": pa.array(["s0"] * len(part), pa.string()), "row_index": pa.array(part, pa.int64())})
        sink = pa.BufferOutputStream()
        pq.write_table(ids, sink)
        ids_bytes = sink.getvalue().to_pybytes()
        name = f"shard-{s:05d}"
        (work / f"{name}.faiss").write_bytes(data)
        (work / f"{name}.ids.parquet").write_bytes(ids_bytes)
        entries.append({"shard": s, "file": f"{name}.faiss", "size": len(data), "sha256": F.sha256_bytes(data),
                        "ids_file": f"{name}.ids.parquet", "ids_size": len(ids_bytes),
                        "ids_sha256": F.sha256_bytes(ids_bytes), "ntotal": len(part), "offset": offset})
        offset += len(part)
    return entries


def check_search(ctx: Ctx) -> list[Row]:
    """``ShardSearcher`` per shard (verified load, ``to_device``) + ``SearchRouter``'s exact merge, against one
    in-process faiss ``IndexFlatIP`` over all vectors; recall against an exact torch matmul top-k on the device."""
    import faiss
    import numpy as np
    import pyarrow as pa
    import torch

    from operators import faiss_shards as F
    from operators.search_ops import SearchRouter, ShardSearcher

    n, dim, nq, k, shards = ctx.profile.search
    t0 = time.perf_counter()
    X = make_vectors(n, dim, clusters=1000, noise=1.0, seed=0, stream=0, superclusters=50, spread=2.0)
    Q = make_vectors(nq, dim, clusters=1000, noise=1.0, seed=0, stream=1, superclusters=50, spread=2.0)
    d = ctx.work / "index"
    d.mkdir(exist_ok=True)
    entries = _write_shards(d, X, shards)
    threads = len(os.sched_getaffinity(0))
    searchers = [ShardSearcher(str(d), e, F.SearchParams(k=k), device=ctx.device, threads=threads) for e in entries]
    prep_s = time.perf_counter() - t0

    class LocalRouter(SearchRouter):
        """The router's own merge and Arrow assembly; the fan-out calls the searchers in this process."""

        def _search_all(self, q: Any) -> list[dict[str, Any]]:
            return [s.search(q, self.k) for s in self.searchers]

    router = LocalRouter(searchers, k, dim)
    qb = min(1024, nq)
    blocks = []
    for lo in range(0, nq, qb):
        m = _meta(min(qb, nq - lo), "queries", lo)
        m = {c: pa.array(v.tolist()) for c, v in m.items()}
        emb = pa.FixedSizeListArray.from_arrays(pa.array(Q[lo:lo + qb].reshape(-1)), dim)
        blocks.append(pa.table(m | {"embedding": emb}))
    flat = faiss.IndexFlatIP(dim)
    flat.add(X)
    Qs = [Q[lo:lo + qb] for lo in range(0, nq, qb)]
    nb = len(blocks)
    u, r, peak = _rates(ctx, qb, lambda b: router(blocks[b % nb]), lambda b: flat.search(Qs[b % nb], k))
    # Exact reference on the device: fp32 matmul (torch's default: no TF32) + topk, in query chunks.
    Xt = torch.from_numpy(X).to(ctx.device)
    t0 = time.perf_counter()
    ref = np.concatenate([torch.topk(torch.from_numpy(q).to(ctx.device) @ Xt.T, k, dim=1).indices.cpu().numpy()
                          for q in Qs])
    torch_rate = nq / (time.perf_counter() - t0)
    got = pa.concat_tables([router(b) for b in blocks])
    qid = np.asarray([int(s[1:]) for s in got.column("id").to_pylist()])
    doc = np.asarray([int(s[1:]) for s in got.column("doc_id").to_pylist()])
    hits = sum(len(set(doc[qid == i]) & set(ref[i])) for i in range(nq))
    raw_ids = np.concatenate([flat.search(q, k)[1] for q in Qs])
    on_gpu = any(type(s.index).__name__.startswith("Gpu") for s in searchers)
    row = Row("ShardSearcher+SearchRouter", f"Flat {n} x {dim}, {shards} shards, k={k}, faiss "
              f"{'GPU' if on_gpu else 'CPU'}", qb, "fp32", u, r, "queries/s", peak_mib=peak,
              recall=hits / (nq * k))
    row.udf_vs_raw = float(np.mean([len(set(doc[qid == i]) ^ set(raw_ids[i])) > 0 for i in range(nq)]))
    row.notes += [f"raw = one faiss IndexFlatIP, {threads} threads", f"torch exact top-k on {ctx.device}: "
                  f"{torch_rate:.1f} queries/s", "UDF = raw: share of queries whose id sets differ",
                  f"prepare {prep_s:.1f}s"]
    return [row]


# --- driver -------------------------------------------------------------------------------------------------


def _header(ctx: Ctx, args: argparse.Namespace) -> list[str]:
    import faiss
    import open_clip
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if ctx.device == "cuda" else "-"
    return [f"command: `python benchmarks/gpu_check.py {' '.join(args.argv)}`",
            f"host: {platform.node()}, {len(os.sched_getaffinity(0))} CPUs, python {platform.python_version()}",
            f"device: {ctx.device} ({gpu}), precision {ctx.requested} -> {ctx.precision}, decode procs {ctx.workers}",
            f"torch {torch.__version__} (cuda {torch.version.cuda}), open_clip {open_clip.__version__}, "
            f"transformers {transformers.__version__}, faiss {faiss.__version__} "
            f"(GPUs visible to faiss: {getattr(faiss, 'get_num_gpus', lambda: 0)()})"]


def table(rows: list[Row]) -> list[str]:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return out + ["| " + " | ".join(r.cells()) + " |" for r in rows]


def _write(path: str | None, text: str) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp16"), default="auto",
                    help="what the UDFs are given (auto: bf16 where the GPU supports it, else fp16; fp32 on CPU)")
    ap.add_argument("--small", action="store_true", help="tiny models and data (the CPU mode of the test suite)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip the rows that would start after this")
    ap.add_argument("--only", default="", help="comma-separated check names to run (decode, image, fp16, fed, "
                                               "text, clip, blip_itm, vlm_yesno, vlm_shared, search)")
    ap.add_argument("--workers", type=int, default=0, help="decode processes (0: CPUs - 1, at most 15)")
    ap.add_argument("--out", help="write the markdown table here (rewritten after every row)")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--workdir", help="scratch directory (default: a temporary one)")
    args = ap.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    t_start = time.perf_counter()
    cpus = len(os.sched_getaffinity(0))
    workers = args.workers or max(1, min(cpus - 1, 15))
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    import open_clip  # noqa: F401 - imported once here, inherited by the forked decode processes
    import torch

    import operators.embedders  # noqa: F401

    # Forked before CUDA is initialised in this process (is_available() below does not create a context).
    pool = mp.get_context("fork").Pool(workers, initializer=_pool_init) if not only or "fed" in only else None

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no GPU")
    if device == "cpu" and args.precision != "auto":
        ap.error("--precision: the UDFs run fp32 on CPU (only auto)")
    profile = SMALL if args.small else GPU
    tmp = tempfile.TemporaryDirectory(prefix="mmr-gpu-check-") if not args.workdir else None
    work = Path(args.workdir or tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(device, profile, work, workers, args.precision)
    checks: list[tuple[str, Callable[[], list[Row]]]] = [
        ("decode", lambda: check_decode(ctx)),
        *[("image", lambda m=m, b=b: check_image_embedder(ctx, m, b)) for m, b in profile.embed],
        ("text", lambda: check_text_embedder(ctx)),
        ("fed", lambda: check_fed(ctx, pool)),
        ("clip", lambda: check_reranker(ctx, "clip")),
        ("search", lambda: check_search(ctx)),
        ("blip_itm", lambda: check_reranker(ctx, "blip_itm")),
        ("vlm_yesno", lambda: check_reranker(ctx, "vlm_yesno")),
        ("vlm_shared", lambda: check_vlm_shared(ctx)),
    ]
    if profile.fp16_model and device == "cuda" and ctx.precision != "fp16":
        checks.append(("fp16", lambda: check_image_embedder(ctx, profile.fp16_model, (1024,), "fp16")))
    head = _header(ctx, args)
    for line in head:
        log.info("%s", line)
    rows: list[Row] = []
    for name, fn in checks:
        if only and name not in only:
            continue
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            rows.append(Row(name, "", notes=[f"skipped: {elapsed:.0f}s > budget {args.budget_s:.0f}s"]))
            continue
        t0 = time.perf_counter()
        try:
            got = fn()
        except Exception as e:  # noqa: BLE001 - one failing path must not hide the others
            log.error("check %s failed:\n%s", name, traceback.format_exc())
            got = [Row(name, "", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")]
            ctx.free()
        for r in got:
            r.seconds = time.perf_counter() - t0
            log.info("%s", " | ".join(r.cells()))
        rows += got
        ctx.free()  # the check's models are unreachable once it returned
        _write(args.out, "\n".join(head + [""] + table(rows)) + "\n")
    if pool is not None:
        pool.close()
        pool.join()
    text = "\n".join(head + [""] + table(rows) + ["", f"total {time.perf_counter() - t_start:.0f}s"])
    print(text)
    _write(args.out, text + "\n")
    _write(args.json, json.dumps({"header": head, "device": device, "precision": ctx.precision,
                                  "rows": [asdict(r) | {"ratio": r.ratio} for r in rows]}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
