"""``cross_encoder`` backend: a text cross-encoder over (query, caption) pairs.

Any ``AutoModelForSequenceClassification`` checkpoint with one or two labels (for example
``cross-encoder/ms-marco-MiniLM-L-6-v2``). The score of a pair is

* ``num_labels == 1``: ``sigmoid(logit)`` (sentence-transformers' ``CrossEncoder`` default), so scores
  and selection thresholds lie in [0, 1]. The order is the logit's; ``spec.extra["activation"] = "none"``
  keeps the raw logit instead (no saturation near 0/1 for very confident models);
* ``num_labels == 2``: ``softmax(logits)[:, 1]``, P(label 1 = relevant).

The backend needs a caption for every pair: a pair without one raises ``ValueError`` (the pipeline
turns it into a reject row). Images are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from operators.rerankers import hf
from operators.rerankers.base import Reranker, RerankerLoadError, RerankerSpec, register

log = logging.getLogger(__name__)

_ACTIVATIONS = ("sigmoid", "none")


class CheckedLoad:
    """``model_cls`` whose ``from_pretrained`` refuses a checkpoint that leaves weights uninitialised.

    transformers random-initialises weights a checkpoint lacks (a ``BertModel`` loaded as
    ``BertForSequenceClassification`` gets a random ``classifier``) and only logs a warning; scoring
    with such a head is meaningless, so it is a :class:`RerankerLoadError` here. Passed to
    :func:`hf.load_model` in place of the class, so safetensors, revision pinning and LoRA stay as
    they are (the check runs before the adapter is applied).
    """

    def __init__(self, model_cls: Any, label: str | None) -> None:
        self.model_cls, self.label = model_cls, label
        self.__name__ = model_cls.__name__

    def from_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        model, info = self.model_cls.from_pretrained(*args, output_loading_info=True, **kwargs)
        check_loading_info(info, self.__name__, self.label)
        return model


def _some(keys: Any, n: int = 8) -> str:
    keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def check_loading_info(info: dict[str, Any], cls_name: str, label: str | None) -> None:
    """Raise :class:`RerankerLoadError` if ``from_pretrained`` left weights missing or mismatched."""
    missing = info.get("missing_keys") or ()
    mismatched = info.get("mismatched_keys") or ()
    errors = info.get("error_msgs") or ()
    if missing:
        raise RerankerLoadError(
            f"rerank.model: {label!r} is not a {cls_name} checkpoint: {len(missing)} weights are missing "
            f"and would be randomly initialised: {_some(missing)}")
    if mismatched:
        raise RerankerLoadError(f"rerank.model: {label!r}: weights with the wrong shape for {cls_name}: "
                                f"{_some(mismatched)}")
    if errors:
        raise RerankerLoadError(f"rerank.model: {label!r}: errors loading {cls_name}: "
                                f"{'; '.join(map(str, errors))}")
    unexpected = info.get("unexpected_keys") or ()
    if unexpected:
        log.warning("rerank.model %r: %d checkpoint weights unused by %s: %s", label, len(unexpected),
                    cls_name, _some(unexpected))


def check_tokenizer(tokenizer: Any, config: Any, label: str | None) -> None:
    """Refuse a tokenizer with no vocabulary or one the model cannot embed.

    transformers builds an *empty* tokenizer (special tokens only, every word ``[UNK]``) from a
    directory that has a model but no tokenizer files, without an error.
    """
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - a tokenizer without get_vocab: nothing to check
        return
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    if not set(vocab) - special:
        raise RerankerLoadError(f"rerank.model: {label!r} has no tokenizer files (the loaded tokenizer has "
                                "special tokens only)")
    n_embed = getattr(config, "vocab_size", None)
    if isinstance(n_embed, int) and len(tokenizer) > n_embed:
        raise RerankerLoadError(f"rerank.model: {label!r}: the tokenizer has {len(tokenizer)} tokens but the "
                                f"model embeds only {n_embed}")


def text_max_length(spec_max: int, tokenizer: Any, config: Any) -> int:
    """``rerank.max_length`` capped by what the tokenizer and the position embeddings allow."""
    n = int(spec_max)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        n = min(n, tok_max)
    pos_max = getattr(config, "max_position_embeddings", None)
    if isinstance(pos_max, int) and pos_max > 0:
        n = min(n, pos_max)
    return n


@register("cross_encoder")
class CrossEncoderReranker(Reranker):
    needs_image = False
    needs_caption = True

    def __init__(self, spec: RerankerSpec, device: str = "cpu", precision: str = "fp32") -> None:
        super().__init__(spec, device, precision)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.activation = str(spec.extra.get("activation", "sigmoid")).lower()
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"cross_encoder: activation must be one of {_ACTIVATIONS}, "
                             f"got {self.activation!r}")
        self.model = hf.load_model(CheckedLoad(AutoModelForSequenceClassification, spec.model), spec, device,
                                   precision)
        self.num_labels = int(self.model.config.num_labels)
        if self.num_labels not in (1, 2):
            raise RerankerLoadError(f"rerank.model: {spec.model!r} has {self.num_labels} labels; the "
                                    "cross_encoder backend needs 1 (relevance logit) or 2 (label 1 = relevant)")
        self.tokenizer = hf.load_processor(AutoTokenizer, spec)
        check_tokenizer(self.tokenizer, self.model.config, spec.model)
        self.max_length = text_max_length(spec.max_length, self.tokenizer, self.model.config)

    def score(self, queries: Sequence[str], images: Sequence[Image.Image | None],
              captions: Sequence[str | None]) -> np.ndarray:
        import torch

        if len(queries) != len(captions):
            raise ValueError(f"cross_encoder: {len(queries)} queries but {len(captions)} captions")
        for i, (q, c) in enumerate(zip(queries, captions, strict=True)):
            if c is None:
                raise ValueError(f"cross_encoder needs a caption for every pair (pair {i} has none)")
            if q is None:
                raise ValueError(f"cross_encoder: pair {i} has no query text")
        if not queries:
            return np.zeros(0, dtype=np.float32)
        enc = self.tokenizer(list(queries), list(captions), padding=True, truncation="longest_first",
                             max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.inference_mode():
            logits = self.model(**enc).logits.float()
        if self.num_labels == 2:
            s = torch.softmax(logits, dim=-1)[:, 1]
        else:
            s = logits[:, 0]
            if self.activation == "sigmoid":
                s = torch.sigmoid(s)
        return s.cpu().numpy().astype(np.float32)
