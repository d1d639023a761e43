"""Ray Train loop of the ``vlm_yesno`` target: RagVL's recipe (arXiv 2407.21439) in miniature.

Each example is (query, candidate image + caption, relevant?) with positives from qrels and negatives
from the retriever's own candidates (``hard``) or random corpus docs (``random``). The model reads
exactly what the ``vlm_yesno`` backend gives it at inference (its ``build_prompt`` / ``build_text`` and
processor, same prompt and answer words) and is trained on the two answer logits at the next-token
position, i.e. on the score the backend computes (softmax over positive / negative): ``pointwise``,
RagVL's cross-entropy of each pair's answer; ``listwise``, localized contrastive estimation (LCE, Gao et
al. 2021, "Rethink Training of BERT Rerankers in Multi-Stage Retrieval Pipeline"): each positive's margin
``logit(Yes) - logit(No)`` in a softmax against its query's negatives, which ranks rather than calibrates.
Full fine-tuning for small bases, LoRA (peft) for large ones (``train.lora``); the saved directory is a
model (with its processor) or an adapter, used by ``rerank:`` as ``model`` / ``lora_adapter``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

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


def use_lora(lora: dict[str, Any], n_params: int) -> bool:
    if lora["enabled"] == "auto":
        return n_params > lora["full_finetune_max_params"]
    return bool(lora["enabled"])


def pair_logits(rr: Any, model: Any, queries: list[str], images: list[Any], captions: list[str | None]) -> Any:
    """[positive, negative] logits at the next-token position, built as the backend builds its input."""
    import torch

    texts = [rr.build_text(rr.build_prompt(q, c)) for q, c in zip(queries, captions, strict=True)]
    enc = rr.processor(text=texts, images=images, padding=True, return_tensors="pt", **rr.processor_kwargs)
    inputs = {k: v.to(rr.device) if isinstance(v, torch.Tensor) else v for k, v in enc.items()}
    out = model(**inputs, logits_to_keep=1) if rr._keep_last else model(**inputs)
    return out.logits[:, -1][:, [rr.pos_id, rr.neg_id]].float()  # left-padded: the last position


def query_groups(examples: list[tuple[str, str, int]]) -> list[tuple[str, list[str], list[str]]]:
    """``(query, positives, negatives)`` per query, sorted by query id; queries without a positive or a
    negative are left out (LCE needs both)."""
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for q, d, label in examples:
        groups.setdefault(q, ([], []))[0 if label else 1].append(d)
    return [(q, pos, neg) for q, (pos, neg) in sorted(groups.items()) if pos and neg]


def lce_loss(logits: Any, sizes: list[tuple[int, int]]) -> Any:
    """Sum over positives of ``-log softmax([s_pos, s_neg...])[0]``, ``s = logit(Yes) - logit(No)``.

    ``logits``: [positive, negative] answer logits of the pairs, each query's positives then its negatives
    in the order of ``sizes`` ((n_pos, n_neg) per query)."""
    import torch

    s = logits[:, 0] - logits[:, 1]
    total, i = s.new_zeros(()), 0
    for n_pos, n_neg in sizes:
        pos, neg = s[i:i + n_pos], s[i + n_pos:i + n_pos + n_neg]
        i += n_pos + n_neg
        rows = torch.cat([pos[:, None], neg[None, :].expand(n_pos, n_neg)], dim=1)
        total = total - torch.log_softmax(rows, dim=1)[:, 0].sum()
    return total


def lce_worker_loss(logits: Any, sizes: list[tuple[int, int]], batch_positives: int, world: int) -> Any:
    """One worker's share of the global batch's mean LCE: its sum scaled by ``world / batch_positives``, so
    the average of the workers' gradients (DDP) is the gradient of the whole batch's mean."""
    return lce_loss(logits, sizes) * (world / batch_positives)


def _validate(rr: Any, model: Any, ts: TrainingSet, batch_size: int) -> dict[str, float]:
    """Rerank every held-out query's candidates by P(positive), exactly as the backend scores them."""
    rr.model = model
    model.eval()
    ranking: dict[str, list[str]] = {}
    for q in ts.heldout_ids:
        cands = ts.candidates.get(q, [])
        scores: list[float] = []
        for i in range(0, len(cands), batch_size):
            ids = cands[i:i + batch_size]
            scores += rr.score([ts.texts[q]] * len(ids), [ts.image(d) for d in ids],
                               [ts.docs[d][1] for d in ids]).tolist()
        ranking[q] = [d for _s, d in sorted(zip(scores, cands, strict=True), key=lambda x: (-x[0], x[1]))]
    model.train()
    return ranking_metrics(ts.qrels, ranking)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker`` for the vlm_yesno target (``config`` from :mod:`pipelines.train`)."""
    import ray
    import ray.train.torch
    import torch
    import torch.nn.functional as F

    from operators.rerankers.vlm_yesno import VlmYesNoReranker

    rank, world, device = worker_setup(config["torch_threads"])
    ts: TrainingSet = ray.get(config["data"])
    torch.manual_seed(config["seed"])
    rr = VlmYesNoReranker(config["spec"], device=str(device.type), precision="fp32")
    model = rr.model
    n_params = sum(p.numel() for p in model.parameters())
    lora = use_lora(config["lora"], n_params)
    if lora:
        from peft import LoraConfig, get_peft_model

        lc = config["lora"]
        model = get_peft_model(model, LoraConfig(r=lc["r"], lora_alpha=lc["alpha"], lora_dropout=lc["dropout"],
                                                 target_modules=list(lc["target_modules"]), bias="none"))
    if rank == 0:
        log.info("vlm_yesno training: %s, %d parameters, %s", type(rr.model).__name__, n_params,
                 "LoRA (peft)" if lora else "full fine-tuning")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config["lr"],
                            weight_decay=config["weight_decay"])
    state = restore(model, opt, config) or {"epoch": -1, "step": 0, "history": []}
    ddp = (ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
           if world > 1 else model)

    def save(d: Any) -> None:
        save_state(d, model, opt, {**state, "lora": lora}, trainable_only=True)
        model.save_pretrained(str(d / OUTPUT_DIR), safe_serialization=True)  # a LoRA model saves its adapter
        if not lora:
            rr.processor.save_pretrained(str(d / OUTPUT_DIR))

    listwise = config.get("loss") == "listwise"
    groups = query_groups(ts.examples) if listwise else []
    if listwise and not groups:
        raise ValueError("loss listwise: no training query has both a positive and a negative")
    epochs, started = config["epochs"], time.monotonic()
    if state["epoch"] + 1 >= epochs:
        report_finished(rank, state, save)
        return
    for epoch in range(state["epoch"] + 1, epochs):
        losses = []
        n = len(groups) if listwise else len(ts.examples)
        for batch in global_batches(epoch_order(n, config["seed"], epoch), config["batch_size"], world):
            if listwise:
                mine = [groups[int(i)] for i in batch[rank::world]]
                pairs = [(q, d) for q, pos, neg in mine for d in pos + neg]
            else:
                ex = [ts.examples[int(i)] for i in batch[rank::world]]
                pairs = [(q, d) for q, d, _l in ex]
            logits = pair_logits(rr, ddp, [ts.texts[q] for q, _d in pairs], [ts.image(d) for _q, d in pairs],
                                 [ts.docs[d][1] for _q, d in pairs])
            if listwise:
                loss = lce_worker_loss(logits, [(len(pos), len(neg)) for _q, pos, neg in mine],
                                       sum(len(groups[int(i)][1]) for i in batch), world)
            else:
                target = torch.tensor([0 if label else 1 for _q, _d, label in ex], device=logits.device)
                loss = F.cross_entropy(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            state["step"] += 1
        metrics = _validate(rr, model, ts, config["eval_batch_size"]) if rank == 0 else {}
        end_epoch(rank, "vlm_yesno", epoch, epochs, state, losses, metrics, started, save)
