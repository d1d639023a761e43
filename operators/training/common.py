"""What both training loops share: worker setup, validation metrics, epoch checkpoints (safetensors)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from operators.storage import Storage

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"  # epoch, step, history: what a resumed run continues from
TRAINABLE_FILE = "trainable.safetensors"  # the trained parameters (resume)
OPTIMIZER_FILE = "optimizer.pt"  # tensors only: loaded with weights_only=True
VALIDATION_CUTOFFS = (1, 5, 10)
OUTPUT_DIR = "model"  # inside each epoch checkpoint: the deliverable, copied as is to train.output
# Written last into each checkpoint: every other file's size and sha256. Ray Train copies a checkpoint file by
# file in no set order, so a kill -9 mid-copy can leave any file cut; only this list says a copy is whole.
MANIFEST_FILE = "checkpoint_files.json"


def worker_setup(torch_threads: int) -> tuple[int, int, Any]:
    """``(rank, world_size, device)`` of this Ray Train worker, torch threads set, logging to stderr."""
    import ray.train
    import ray.train.torch
    import torch

    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    if not logging.getLogger().handlers:  # a Ray worker: Ray forwards stderr to the driver's console
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("operators").setLevel(logging.INFO)
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def ranking_metrics(qrels: dict[str, dict[str, int]], ranking: dict[str, list[str]]) -> dict[str, float]:
    """Mean recall@1/5/10, MRR@10 and nDCG@10 over every judged query (pytrec_eval, as ``mmrerank eval``)."""
    from operators.metrics import stage_scores

    rows = stage_scores(qrels, ranking, ranking, list(VALIDATION_CUTOFFS))
    names = [f"recall@{c}" for c in VALIDATION_CUTOFFS] + ["mrr@10", "ndcg@10"]
    return {n: round(sum(r[n] for r in rows.values()) / max(1, len(rows)), 6) for n in names}


def tensors_of(module: Any, trainable_only: bool) -> dict[str, Any]:
    """Parameters as contiguous CPU copies (copies: safetensors refuses tensors that share memory)."""
    return {n: p.detach().cpu().clone().contiguous() for n, p in module.named_parameters()
            if p.requires_grad or not trainable_only}


def load_trainable(module: Any, path: str) -> None:
    """Put a checkpoint's trained parameters back; every trainable parameter must be there, same shape."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(path)
    params = dict(module.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    missing, bad = sorted(wanted - set(saved)), [n for n in saved if n in params and params[n].shape != saved[n].shape]
    if missing or bad or set(saved) - set(params):
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing[:5]}, wrong shape "
                           f"{bad[:5]}, unknown {sorted(set(saved) - set(params))[:5]}")
    with torch.no_grad():
        for n, t in saved.items():
            params[n].copy_(t)


@contextmanager
def epoch_checkpoint_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mmr-train-ckpt-") as d:
        yield Path(d)


def save_state(d: Path, module: Any, optimizer: Any, state: dict[str, Any], trainable_only: bool) -> None:
    import torch
    from safetensors.torch import save_file

    save_file(tensors_of(module, trainable_only), str(d / TRAINABLE_FILE))
    torch.save(optimizer.state_dict(), d / OPTIMIZER_FILE)
    (d / STATE_FILE).write_text(json.dumps(state, indent=2))


def write_manifest(d: Path) -> None:
    """List every file of the checkpoint directory ``d`` with its size and sha256 (call after the last write)."""
    import hashlib

    files = {p.relative_to(d).as_posix(): {"bytes": p.stat().st_size,
                                           "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(d.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    (d / MANIFEST_FILE).write_text(json.dumps(files, indent=1, sort_keys=True))


def checkpoint_problem(storage: Storage, ckpt: str) -> str | None:
    """Why the checkpoint at ``ckpt`` is not whole (no or cut manifest, a file missing, cut or changed), or
    None when every file its manifest lists is there with that size and sha256."""
    from operators.storage import join

    try:
        files = json.loads(storage.read_bytes(join(ckpt, MANIFEST_FILE)))
    except FileNotFoundError:
        return f"no {MANIFEST_FILE}"
    except ValueError:
        return f"{MANIFEST_FILE} cut short"
    for rel, want in sorted(files.items()):
        uri = join(ckpt, rel)
        if not storage.exists(uri):
            return f"{rel} missing"
        if int(storage.info(uri).get("size", -1)) != want["bytes"]:
            return f"{rel} has {storage.info(uri).get('size')} bytes, not {want['bytes']}"
        if storage.sha256(uri) != want["sha256"]:
            return f"{rel} does not match its sha256"
    return None


def restore(module: Any, optimizer: Any, config: dict[str, Any]) -> dict[str, Any] | None:
    """The state of Ray Train's latest checkpoint of this run, else of ``config["resume_from"]`` (the last
    checkpoint of a killed earlier run), weights and optimizer loaded; None to start afresh."""
    import ray.train
    import torch

    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("resume_from"):
        from operators.storage import arrow_filesystem

        fs, path = arrow_filesystem(config["resume_from"], config.get("storage_options") or {})
        ckpt = ray.train.Checkpoint(path=path, filesystem=fs)
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        load_trainable(module, os.path.join(d, TRAINABLE_FILE))
        optimizer.load_state_dict(torch.load(os.path.join(d, OPTIMIZER_FILE), weights_only=True))
        state = json.loads(Path(d, STATE_FILE).read_text())
    log.info("resuming from the checkpoint of epoch %d (step %d)", state["epoch"] + 1, state["step"])
    return state


def report_epoch(rank: int, d: Path | None, metrics: dict[str, Any]) -> None:
    """Every worker reports (a barrier); rank 0 hands over the epoch's checkpoint directory."""
    import ray.train
    from ray.train import Checkpoint

    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(d)) if d is not None else None)


def end_epoch(rank: int, target: str, epoch: int, epochs: int, state: dict[str, Any], losses: list[float],
              metrics: dict[str, float], started: float, save: Callable[[Path], None]) -> None:
    """Record the epoch in ``state``, log its progress line (rank 0) and report it with its checkpoint."""
    import numpy as np

    row = {"epoch": epoch + 1, "step": state["step"], "loss": float(np.mean(losses)) if losses else float("nan"),
           **metrics}
    state["epoch"] = epoch
    state["history"].append(row)
    if rank == 0:
        log.info("%s", progress_line(target, epoch, epochs, state["step"], row["loss"], metrics, started))
    with epoch_checkpoint_dir() as d:
        if rank == 0:
            save(d)
            write_manifest(d)
        report_epoch(rank, d if rank == 0 else None, row)


def report_finished(rank: int, state: dict[str, Any], save: Callable[[Path], None]) -> None:
    """A run restored after its last epoch (killed before the driver got the result): report it once more."""
    with epoch_checkpoint_dir() as d:
        if rank == 0:
            save(d)
            write_manifest(d)
        report_epoch(rank, d if rank == 0 else None, state["history"][-1] if state["history"] else {})


def progress_line(target: str, epoch: int, epochs: int, step: int, loss: float, metrics: dict[str, float],
                  started: float) -> str:
    done = int(20 * (epoch + 1) / epochs)
    shown = " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k in ("recall@10", "mrr@10", "ndcg@10"))
    return (f"train {target} [{'#' * done}{'.' * (20 - done)}] epoch {epoch + 1}/{epochs} step {step}: "
            f"loss {loss:.4f}, held-out {shown} ({time.monotonic() - started:.1f} s)")
