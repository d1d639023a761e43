"""Quick speed check of ``rerank.prefix_sharing`` (vlm_yesno): the per-pair path vs shared prefixes, one process.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_prefix_sharing.py              # 20 docs x 6 queries, 448 px
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_prefix_sharing.py --docs 4 --rounds 1     # smoke

A random Qwen2-VL-shaped model (default ~14M parameters: a 2-block 384-wide vision tower, a 4-layer 384-wide
language model over the word-level vocabulary of ``tests/tiny_vlm.py``) is saved once to a temp dir and loaded
twice through the real loader, ``prefix_sharing: off`` and ``auto``. ``--docs`` random ``--image-size`` px images
(448 px = 256 image tokens), ``--queries`` queries each, captions on. ``score`` runs on batches of
``--batch-size`` pairs in doc order, as the rerank stage calls it (a doc may straddle two batches). One torch
thread; the two paths alternate ``--rounds`` times (off, shared, off, shared, ...) after one untimed warm-up
batch each; pairs/s per round, then the median ratio. Also the largest score difference between the paths.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401 - puts the repo root on sys.path
import numpy as np


def build(path: Path, vision_dim: int, vision_depth: int, text_dim: int, text_layers: int) -> int:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    from tests.tiny_vlm import build_processor

    processor = build_processor()
    processor.image_processor = Qwen2VLImageProcessor()  # the stock pixel bounds: 448 px stays 448 px
    v = processor.tokenizer.get_vocab()
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(v), hidden_size=text_dim, intermediate_size=4 * text_dim,
                         num_hidden_layers=text_layers, num_attention_heads=text_dim // 64,
                         num_key_value_heads=max(1, text_dim // 192), max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [8, 12, 12]},
                         bos_token_id=v["<|endoftext|>"], eos_token_id=v["<|im_end|>"], pad_token_id=v["<|endoftext|>"]),
        vision_config=dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=text_dim, num_heads=vision_dim // 64,
                           mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=v["<|image_pad|>"], video_token_id=v["<|video_pad|>"],
        vision_start_token_id=v["<|vision_start|>"], vision_end_token_id=v["<|vision_end|>"])
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=20)
    ap.add_argument("--queries", type=int, default=6, help="queries per doc")
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per score() call (rerank.batch_size)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--vision-dim", type=int, default=384)
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--text-dim", type=int, default=384)
    ap.add_argument("--text-layers", type=int, default=4)
    args = ap.parse_args(argv)

    import torch
    from PIL import Image

    from operators.rerankers.base import RerankerSpec, create
    from tests.tiny_vlm import WORDS

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    n_params = build(tmp / "model", args.vision_dim, args.vision_depth, args.text_dim, args.text_layers)
    rerankers = {mode: create(RerankerSpec(backend="vlm_yesno", model=str(tmp / "model"), prefix_sharing=mode))
                 for mode in ("off", "auto")}
    assert rerankers["auto"].prefix_sharing  # type: ignore[attr-defined]

    rng = np.random.RandomState(0)
    words = [w for w in WORDS if w.islower()]
    queries, images, captions = [], [], []
    for _ in range(args.docs):
        im = Image.fromarray((rng.rand(args.image_size, args.image_size, 3) * 255).astype(np.uint8))
        cap = " ".join(rng.choice(words, 8))
        for _ in range(args.queries):
            queries.append(" ".join(rng.choice(words, rng.randint(2, 9))))
            images.append(im)  # the doc's one image object, as the rerank stage passes it
            captions.append(cap)
    n, bs = len(queries), args.batch_size

    def run(mode: str) -> tuple[float, np.ndarray]:
        r = rerankers[mode]
        t0 = time.perf_counter()
        out = np.concatenate([r.score(queries[a:a + bs], images[a:a + bs], captions[a:a + bs]) for a in range(0, n, bs)])
        return time.perf_counter() - t0, out

    for mode in rerankers:  # warm-up: one batch each
        rerankers[mode].score(queries[:bs], images[:bs], captions[:bs])
    print(f"model {n_params / 1e6:.1f}M parameters, {args.docs} docs x {args.queries} queries = {n} pairs, "
          f"{args.image_size} px, batches of {bs}, 1 thread", flush=True)
    rate: dict[str, list[float]] = {"off": [], "auto": []}
    scores: dict[str, np.ndarray] = {}
    for rnd in range(args.rounds):
        for mode in ("off", "auto"):
            s, scores[mode] = run(mode)
            rate[mode].append(n / s)
            print(f"round {rnd + 1} {'per-pair' if mode == 'off' else 'shared  '}: {s:6.2f} s  {n / s:7.2f} pairs/s",
                  flush=True)
    ratio = statistics.median(a / b for a, b in zip(rate["auto"], rate["off"], strict=True))
    print(f"per-pair {statistics.median(rate['off']):.2f} pairs/s, shared {statistics.median(rate['auto']):.2f} "
          f"pairs/s, ratio {ratio:.2f}x; max |score difference| {np.abs(scores['auto'] - scores['off']).max():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
