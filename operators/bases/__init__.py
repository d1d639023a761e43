"""The pretrained tiny bases shipped with the package, and the strict check that loads them.

Built offline by ``python -m pipelines.pretrain`` on a synthetic stream whose seeds no sample uses
(``pipelines.sample.PRETRAIN_SEEDS_FROM``); each base directory holds its weights, a model card
(``README.md``) and ``card.json`` (data seeds and counts, steps, settings, and the sha256 of every file).
The quickstart and the tests fine-tune from them; a user points ``embed.model.pretrained`` /
``rerank.model`` at them the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

BASES_DIR = Path(__file__).parent
RETRIEVER = "mmr-tiny-retriever"  # open_clip mmr-tiny state dict: embed.model {name: mmr-tiny, pretrained: <file>}
RERANKER = "tiny-vlm-reranker"  # a Qwen2-VL directory (weights + processor): rerank.model
RETRIEVER_WEIGHTS = "model.safetensors"
CARD_FILE = "card.json"


class BaseCheckError(RuntimeError):
    """A shipped base is missing, incomplete or differs from its card (never replaced by a random model)."""


def sha256_of(path: Path) -> str:
    from operators.storage import Storage

    return Storage().sha256(str(path))


def checked_base(name: str, root: Path = BASES_DIR) -> Path:
    """The directory of base ``name`` after checking every file its card lists against its sha256."""
    d = root / name
    card_path = d / CARD_FILE
    if not card_path.is_file():
        raise BaseCheckError(f"pretrained base {name!r}: {card_path} is missing (rebuild it with "
                             "`python -m pipelines.pretrain`)")
    files: dict[str, str] = json.loads(card_path.read_text())["files"]
    for rel, want in sorted(files.items()):
        f = d / rel
        if not f.is_file():
            raise BaseCheckError(f"pretrained base {name!r}: {rel} is missing from {d}")
        got = sha256_of(f)
        if got != want:
            raise BaseCheckError(f"pretrained base {name!r}: {rel} has sha256 {got[:12]}..., its card says "
                                 f"{want[:12]}... (a changed or partly written file)")
    return d


def retriever_weights(root: Path = BASES_DIR) -> str:
    """The shipped retriever's checkpoint, for ``embed.model: {name: mmr-tiny, pretrained: <this>}``."""
    return str(checked_base(RETRIEVER, root) / RETRIEVER_WEIGHTS)


def reranker_dir(root: Path = BASES_DIR) -> str:
    """The shipped yes/no reranker's directory, for ``rerank.model`` / ``train.model``."""
    return str(checked_base(RERANKER, root))
