"""``python -m pipelines.pretrain``: build the shipped tiny bases offline, the way real bases are made.

A real reranker starts from a pretrained VLM (Qwen2-VL-2B) and a real retriever from a pretrained CLIP; users
fine-tune them on their own labels. The tiny stand-ins are pretrained here once, on a synthetic stream of the
sample generator (``pipelines.sample.pretrain_group``; seeds >= ``PRETRAIN_SEEDS_FROM``, which no sample may
use), and shipped in ``operators/bases/`` with a model card and the sha256 of every file.

- **Reranker** (``tiny-vlm-reranker``, a Qwen2-VL): the ``vlm_yesno`` input exactly as the backend builds
  it (prompt with caption, image first), trained on two losses: the yes/no answer ranked listwise (LCE, as
  ``mmrerank train``) and, at each (color, shape) the query names, the same Yes/No answer to "is this pair
  in the doc?" (dense supervision: the per-pair check that the final answer is the AND of). With the
  answer loss alone, a model of this size learns the shape count or bag-of-words and stays on that plateau
  for thousands of steps; so it does with the default init (std 0.02: near-uniform attention), hence 0.15.
- **Retriever** (``mmr-tiny-retriever``, open_clip mmr-tiny): symmetric InfoNCE over (caption, image) and
  (query, relevant image) pairs of the same stream.

One process, plain torch, fixed seeds and thread count: a rebuild on the same machine gives the same bytes
(``--check`` rebuilds into a temporary directory and compares with the shipped cards). Ray Train is for the
users' fine-tuning (``mmrerank train``); this is a build step of the package, run by its maintainers.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from operators.bases import BASES_DIR, CARD_FILE, RERANKER, RETRIEVER, RETRIEVER_WEIGHTS, sha256_of
from pipelines.sample import PRETRAIN_SEEDS_FROM, PretrainGroup, pretrain_group

log = logging.getLogger(__name__)

THREADS = 2  # torch threads: fixed, because float summation order (and so the bytes) depends on it
RERANKER_SEED = PRETRAIN_SEEDS_FROM  # the stream of the reranker's groups
RETRIEVER_SEED = PRETRAIN_SEEDS_FROM + 1  # the retriever's: another stream, same generator

# The reranker's recipe (what the card records). A Qwen2-VL of 4 layers, hidden 128 (~0.7M parameters).
RERANKER_SETTINGS: dict[str, Any] = {
    "hidden": 64, "layers": 3, "init_std": 0.15, "steps": 1500, "queries_per_step": 32, "lr": 3e-3,
    "warmup": 0.05, "weight_decay": 0.01, "pair_weight": 1.0, "clip_grad": 1.0, "image_size": 64, "init_seed": 0,
    "save_every": 500,
}
RETRIEVER_SETTINGS: dict[str, Any] = {
    "steps": 2000, "groups_per_step": 12, "lr": 2e-3, "warmup": 0.1, "weight_decay": 0.1,
    "image_size": 64, "init_seed": 0,
}


def _schedule(opt: Any, steps: int, warmup: float) -> Any:
    import torch

    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=steps,
                                               pct_start=warmup)


def _pair_positions(rr: Any, ids: Any, query_pairs: list[tuple[Any, ...]]) -> list[tuple[int, int, int]]:
    """``(row, position, pair index)`` of each query pair's shape word in the tokenized prompts: where the
    auxiliary "is this pair in the caption?" answer is read."""
    marker = rr.tokenizer.convert_tokens_to_ids("Question")
    out = []
    for r, pairs in enumerate(query_pairs):
        row = ids[r].tolist()
        start = max(i for i, t in enumerate(row) if t == marker)
        shape_ids = [rr.tokenizer.convert_tokens_to_ids(shape) for _color, shape in pairs]
        found = [i for i in range(start, len(row)) if row[i] in shape_ids][:len(pairs)]
        out += [(r, pos, shape_ids.index(row[pos])) for pos in found]
    return out


def pretrain_reranker(out: Path, settings: dict[str, Any] = RERANKER_SETTINGS,
                      seed: int = RERANKER_SEED) -> dict[str, Any]:
    """Pretrain the tiny yes/no reranker into ``out`` (model + processor); returns its card."""
    import torch
    import torch.nn.functional as F

    from operators.rerankers.base import RerankerSpec
    from operators.rerankers.vlm_yesno import VlmYesNoReranker
    from operators.training.vlm import lce_loss
    from pipelines.tiny_vlm import save_tiny_vlm

    s = settings
    save_tiny_vlm(out, seed=s["init_seed"], hidden=s["hidden"], layers=s["layers"], init_std=s["init_std"])
    torch.manual_seed(s["init_seed"])
    rr = VlmYesNoReranker(RerankerSpec(backend="vlm_yesno", model=str(out)), precision="fp32")
    model = rr.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    sched = _schedule(opt, s["steps"], s["warmup"])
    started, g, pairs, history = time.monotonic(), 0, 0, []
    for step in range(s["steps"]):
        queries, images, captions, sizes, pair_sets, query_pairs = [], [], [], [], [], []
        for _ in range(s["queries_per_step"]):
            grp: PretrainGroup = pretrain_group(seed, g, s["image_size"])
            g += 1
            order = [i for i, d in enumerate(grp.docs) if d[2]] + [i for i, d in enumerate(grp.docs) if not d[2]]
            for i in order:
                queries.append(grp.query)
                images.append(grp.docs[i][0])
                captions.append(grp.docs[i][1])
                pair_sets.append(grp.doc_pairs[i])
                query_pairs.append(grp.query_pairs)
            n_pos = sum(1 for d in grp.docs if d[2])
            sizes.append((n_pos, len(grp.docs) - n_pos))
        texts = [rr.build_text(rr.build_prompt(q, c)) for q, c in zip(queries, captions, strict=True)]
        enc = rr.processor(text=texts, images=images, padding=True, return_tensors="pt")
        logits = model(**enc).logits
        answer = logits[:, -1][:, [rr.pos_id, rr.neg_id]].float()
        rank_loss = lce_loss(answer, sizes) / sum(p for p, _n in sizes)
        at = _pair_positions(rr, enc["input_ids"], query_pairs)
        pair_answer = logits[[r for r, _p, _k in at], [p for _r, p, _k in at]][:, [rr.pos_id, rr.neg_id]].float()
        present = torch.tensor([0 if query_pairs[r][k] in pair_sets[r] else 1 for r, _p, k in at])
        pair_loss = F.cross_entropy(pair_answer, present)
        loss = rank_loss + s["pair_weight"] * pair_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s["clip_grad"])
        opt.step()
        sched.step()
        pairs += len(texts)
        if step % 100 == 0 or step == s["steps"] - 1:
            row = {"step": step + 1, "rank_loss": round(float(rank_loss.detach()), 4),
                   "pair_loss": round(float(pair_loss.detach()), 4)}
            history.append(row)
            log.info("pretrain reranker: step %d/%d rank loss %.4f pair loss %.4f (%.0f s)", step + 1,
                     s["steps"], row["rank_loss"], row["pair_loss"], time.monotonic() - started)
        if (step + 1) % s["save_every"] == 0:  # a usable model while the build runs (overwritten at the end)
            model.save_pretrained(out, safe_serialization=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    rr.processor.save_pretrained(out)
    return {"base": RERANKER, "kind": "transformers Qwen2VLForConditionalGeneration (vlm_yesno)",
            "parameters": sum(p.numel() for p in model.parameters()), "settings": s,
            "data": {"stream": "pipelines.sample.pretrain_group", "seed": seed, "groups": g, "pairs": pairs},
            "history": history, "wall_s": round(time.monotonic() - started, 1)}


def pretrain_retriever(out: Path, settings: dict[str, Any] = RETRIEVER_SETTINGS,
                       seed: int = RETRIEVER_SEED) -> dict[str, Any]:
    """Pretrain the tiny open_clip retriever (mmr-tiny) into ``out``/model.safetensors; returns its card."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from operators.models import ModelSpec, build_model, image_transform, resolve_model
    from operators.training.clip import contrastive_loss

    s = settings
    rm = resolve_model(ModelSpec(name="mmr-tiny", pretrained=None, seed=s["init_seed"]))
    model, tokenizer = build_model(rm, device="cpu", precision="fp32")
    transform = image_transform(rm.preprocess)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    sched = _schedule(opt, s["steps"], s["warmup"])
    started, g, pairs, history = time.monotonic(), 0, 0, []
    for step in range(s["steps"]):
        texts, images = [], []
        for _ in range(s["groups_per_step"]):
            grp = pretrain_group(seed, g, s["image_size"])
            g += 1
            rng = np.random.default_rng([seed, g])
            positives = [d for d in grp.docs if d[2]]
            texts.append(grp.query)
            images.append(positives[int(rng.integers(len(positives)))][0])
            for image, caption, _rel in grp.docs:  # captions: what the image shows, hard cases included
                texts.append(caption)
                images.append(image)
        x = torch.stack([transform(im) for im in images])
        img, txt, scale = model(x, tokenizer(texts))[:3]
        loss = contrastive_loss(img, txt, None, scale, world=1)  # mmrerank train's clip loss, one process
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        pairs += len(texts)
        if step % 100 == 0 or step == s["steps"] - 1:
            row = {"step": step + 1, "loss": round(float(loss.detach()), 4)}
            history.append(row)
            log.info("pretrain retriever: step %d/%d loss %.4f (%.0f s)", step + 1, s["steps"], row["loss"],
                     time.monotonic() - started)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()},
              str(out / RETRIEVER_WEIGHTS), metadata={"format": "pt"})
    return {"base": RETRIEVER, "kind": "open_clip mmr-tiny state dict (embed.model.pretrained)",
            "parameters": sum(p.numel() for p in model.parameters()), "settings": s,
            "data": {"stream": "pipelines.sample.pretrain_group", "seed": seed, "groups": g, "pairs": pairs},
            "history": history, "wall_s": round(time.monotonic() - started, 1)}


def _versions() -> dict[str, str]:
    import open_clip
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "open_clip": open_clip.__version__,
            "machine": platform.machine(), "torch_threads": str(THREADS)}


def _model_card(card: dict[str, Any]) -> str:
    """The human-readable card: what the base is, what it saw, how to rebuild and check it."""
    d, s = card["data"], card["settings"]
    lines = [
        f"# {card['base']}", "",
        f"A pretrained tiny base of mmrerank: {card['kind']}, {card['parameters']:,} parameters.", "",
        "Built by `python -m pipelines.pretrain` on a synthetic stream of the sample generator "
        f"(`{d['stream']}`, seed {d['seed']}: {d['groups']:,} query groups, {d['pairs']:,} training pairs) "
        f"in {card['wall_s']:.0f} s on {THREADS} CPU threads. No sample that the quickstart, the tests or "
        f"the benchmarks evaluate on shares its seeds (`make_sample` refuses seeds >= {PRETRAIN_SEEDS_FROM}).", "",
        "It knows the generator's world only: 8 colors, 5 shapes, 3 backgrounds, 4 query templates"
        + (", through a word-level vocabulary of those words and the prompt's (any other word reads as [UNK])."
           if card["base"] == RERANKER else " (its BPE tokenizer reads any text, but it has seen no other words).")
        + " It is a stand-in for a real base (Qwen2-VL-2B, CLIP ViT-B-32), small enough to ship and to "
        "fine-tune on a laptop.", "",
        "## Settings", "", "```json", json.dumps(s, indent=2, sort_keys=True), "```", "",
        "## Files (sha256)", "",
        *[f"- `{k}`: `{v}`" for k, v in sorted(card["files"].items())], "",
        "Loading checks every file against `card.json` (`operators.bases.checked_base`); a missing or "
        "changed file is an error, never a random model. `python -m pipelines.pretrain --check` rebuilds "
        "the bases into a temporary directory and compares.", "",
    ]
    return "\n".join(lines)


def write_card(d: Path, card: dict[str, Any]) -> dict[str, Any]:
    card = {**card, "versions": _versions(),
            "files": {p.name: sha256_of(p) for p in sorted(d.iterdir())
                      if p.is_file() and p.name not in (CARD_FILE, "README.md")}}
    (d / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    (d / "README.md").write_text(_model_card(card))
    return card


def build(out: Path, which: Sequence[str]) -> dict[str, dict[str, Any]]:
    import torch

    torch.set_num_threads(THREADS)
    cards = {}
    for name in which:
        d = out / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        card = pretrain_reranker(d) if name == RERANKER else pretrain_retriever(d)
        cards[name] = write_card(d, card)
        log.info("%s: %s", name, ", ".join(f"{k} {v[:12]}" for k, v in cards[name]["files"].items()))
    return cards


def check(which: Sequence[str]) -> bool:
    """Rebuild into a temporary directory; True when every file equals the shipped one (sha256)."""
    with tempfile.TemporaryDirectory(prefix="mmr-pretrain-check-") as tmp:
        cards = build(Path(tmp), which)
    same = True
    for name, card in cards.items():
        shipped = json.loads((BASES_DIR / name / CARD_FILE).read_text())["files"]
        for f, sha in card["files"].items():
            ok = shipped.get(f) == sha
            same &= ok
            log.info("%s/%s: %s", name, f, "same sha256" if ok else f"DIFFERS (rebuilt {sha[:12]}, shipped "
                     f"{str(shipped.get(f))[:12]})")
    return same


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipelines.pretrain", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=BASES_DIR, help="where the base directories go (default: the "
                    "package's operators/bases)")
    ap.add_argument("--only", choices=[RETRIEVER, RERANKER], action="append", help="build only this base")
    ap.add_argument("--check", action="store_true", help="rebuild into a temporary directory and compare the "
                    "sha256 of every file with the shipped cards (exit 1 when any differs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    which = args.only or [RETRIEVER, RERANKER]
    if args.check:
        sys.exit(0 if check(which) else 1)
    build(args.out, which)


if __name__ == "__main__":
    main()
