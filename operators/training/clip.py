"""Ray Train loop of the ``clip`` target: contrastive fine-tuning of an open_clip model on (query, relevant
image) pairs, in-batch negatives plus optional hard negatives (extra images only the text side ranks).

Data parallel and exact: every worker takes its slice of the same global batch, features are gathered
with gradients (``torch.distributed.nn.all_gather``, as open_clip's own ``ClipLoss(gather_with_grad=True)``)
so each worker computes the full-batch loss, and DDP's gradient average then equals one worker's gradient
on the whole batch. 1 and N workers follow the same schedule and reach the same weights (up to float
summation order).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from operators.training.common import (
    OUTPUT_DIR,
    end_epoch,
    ranking_metrics,
    report_finished,
    restore,
    save_state,
    worker_setup,
)
from operators.training.data import TrainingSet, epoch_order, global_batches

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"  # the open_clip state dict: embed.model.pretrained / rerank.clip_model.pretrained


def _gather(x: Any, world: int) -> Any:
    if world == 1:
        return x
    import torch
    import torch.distributed.nn

    return torch.cat(torch.distributed.nn.all_gather(x), dim=0)


def contrastive_loss(img: Any, txt: Any, neg: Any | None, scale: Any, world: int) -> Any:
    """Symmetric InfoNCE over the global batch; hard-negative images (``neg``) widen the text->image side."""
    import torch
    import torch.nn.functional as F

    img_all, txt_all = _gather(img, world), _gather(txt, world)
    labels = torch.arange(txt_all.shape[0], device=txt_all.device)
    targets = img_all if neg is None else torch.cat([img_all, _gather(neg, world)], dim=0)
    t2i = scale * txt_all @ targets.T
    i2t = scale * img_all @ txt_all.T
    return (F.cross_entropy(t2i, labels) + F.cross_entropy(i2t, labels)) / 2


PIXEL_CACHE_BYTES = 512 * 1024**2  # preprocessed images kept per worker across epochs (then: decoded per use)


class PixelCache:
    """Each doc's preprocessed pixels, computed once and reused by every epoch's steps and validation (the
    transform is the pipeline's deterministic one), up to ``max_bytes``; docs beyond that are decoded per use."""

    def __init__(self, ts: TrainingSet, transform: Any, max_bytes: int = PIXEL_CACHE_BYTES) -> None:
        self.ts, self.transform, self.room = ts, transform, max_bytes
        self.cache: dict[str, Any] = {}

    def __call__(self, ids: list[str]) -> Any:
        import torch

        out = []
        for d in ids:
            x = self.cache.get(d)
            if x is None:
                x = self.transform(self.ts.image(d))
                size = x.element_size() * x.nelement()
                if size <= self.room:
                    self.cache[d], self.room = x, self.room - size
            out.append(x)
        return torch.stack(out)


def _pixels(ts: TrainingSet, ids: list[str], transform: Any) -> Any:
    """``transform`` of each doc's decoded image, stacked (``transform`` may be a :class:`PixelCache`'s)."""
    import torch

    if isinstance(transform, PixelCache):
        return transform(ids)
    return torch.stack([transform(ts.image(d)) for d in ids])


def _validate(model: Any, tokenizer: Any, transform: Any, ts: TrainingSet, device: Any) -> dict[str, float]:
    """Rank the validation pool for every held-out query by cosine, as the pipeline's Flat index does."""
    import torch
    import torch.nn.functional as F

    model.eval()
    with torch.inference_mode():
        feats = []
        for i in range(0, len(ts.val_docs), 128):
            x = _pixels(ts, ts.val_docs[i:i + 128], transform).to(device)
            feats.append(F.normalize(model.encode_image(x).float(), dim=-1))
        v = torch.cat(feats)
        t = F.normalize(model.encode_text(tokenizer([ts.texts[q] for q in ts.heldout_ids]).to(device)).float(), dim=-1)
        top = torch.topk(t @ v.T, k=min(100, v.shape[0]), dim=1).indices.cpu().numpy()
    model.train()
    ranking = {q: [ts.val_docs[int(j)] for j in row] for q, row in zip(ts.heldout_ids, top, strict=True)}
    return ranking_metrics(ts.qrels, ranking)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker`` for the clip target (``config`` from :mod:`pipelines.train`)."""
    import ray
    import ray.train.torch
    import torch

    from operators.models import build_model, image_transform

    rank, world, device = worker_setup(config["torch_threads"])
    ts: TrainingSet = ray.get(config["data"])
    torch.manual_seed(config["seed"])
    model, tokenizer = build_model(config["resolved"], device=str(device.type), precision="fp32",
                                   storage_options=config["storage_options"])
    model.train()
    # The pipeline's own preprocessing, each doc's result kept for the next epochs.
    transform = PixelCache(ts, image_transform(config["resolved"].preprocess))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config["lr"], weight_decay=config["weight_decay"])
    state = restore(model, opt, config) or {"epoch": -1, "step": 0, "history": []}
    ddp = ray.train.torch.prepare_model(model) if world > 1 else model.to(device)

    by_query: dict[str, tuple[list[str], list[str]]] = {}
    for q, d, label in ts.examples:
        by_query.setdefault(q, ([], []))[0 if label else 1].append(d)
    # Items: (text, positive docs, hard-negative docs): the training queries, then the caption pairs.
    items = [(ts.texts[q], *by_query[q]) for q in sorted(by_query)]
    items += [(ts.docs[d][1], [d], []) for d in ts.caption_docs]
    all_docs = sorted(ts.docs)

    def save(d: Any) -> None:
        save_state(d, model, opt, state, trainable_only=False)
        _save_weights(model, d)

    epochs, started = config["epochs"], time.monotonic()
    if state["epoch"] + 1 >= epochs:
        report_finished(rank, state, save)
        return
    for epoch in range(state["epoch"] + 1, epochs):
        rng = np.random.default_rng([config["seed"], 13, epoch])
        # One positive per query per epoch: two positives of one query in a batch would be each other's
        # (false) in-batch negatives.
        pos = [p[int(rng.integers(len(p)))] for _t, p, _n in items]
        # One hard negative per item (a random doc for items without one, so every worker gathers as many).
        neg = [n[int(rng.integers(len(n)))] if n else all_docs[int(rng.integers(len(all_docs)))]
               for _t, _p, n in items]
        use_neg = bool(config["hard_negatives"])
        losses = []
        for batch in global_batches(epoch_order(len(items), config["seed"], epoch), config["batch_size"], world):
            mine = [int(i) for i in batch[rank::world]]
            x = _pixels(ts, [pos[i] for i in mine], transform).to(device)
            if use_neg:
                x = torch.cat([x, _pixels(ts, [neg[i] for i in mine], transform).to(device)])
            text = tokenizer([items[i][0] for i in mine]).to(device)
            img_f, txt_f, scale = ddp(x, text)[:3]
            n = len(mine)
            loss = contrastive_loss(img_f[:n], txt_f, img_f[n:] if use_neg else None, scale, world)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # open_clip's clamp of the learned temperature (at most 100)
                model.logit_scale.clamp_(0, np.log(100))
            losses.append(float(loss.detach()))
            state["step"] += 1
        metrics = _validate(model, tokenizer, transform, ts, device) if rank == 0 else {}
        end_epoch(rank, "clip", epoch, epochs, state, losses, metrics, started, save)


def _save_weights(model: Any, d: Any) -> None:
    """The full open_clip state dict (buffers included) as safetensors: open_clip.load_checkpoint reads it."""
    from safetensors.torch import save_file

    (d / OUTPUT_DIR).mkdir(exist_ok=True)
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()},
              str(d / OUTPUT_DIR / WEIGHTS_FILE), metadata={"format": "pt"})
