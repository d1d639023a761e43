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

import numpy as np
from PIL import Image

from operators.rerankers import hf
from operators.rerankers.base import Reranker, RerankerLoadError, RerankerSpec, register

log = logging.getLogger(__name__)

_ACTIVATIONS = ("sigmoid", "none")


@register("cross_encoder")
class CrossEncoderReranker(Reranker):
    needs_image = False
    needs_caption = True
    needs_model = True

    def __init__(self, spec: RerankerSpec, device: str = "cpu", precision: str = "fp32") -> None:
        super().__init__(spec, device, precision)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.activation = str(spec.extra.get("activation", "sigmoid")).lower()
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"cross_encoder: activation must be one of {_ACTIVATIONS}, "
                             f"got {self.activation!r}")
        self.model = hf.load_model(AutoModelForSequenceClassification, spec, device,
                                   precision)
        self.num_labels = int(self.model.config.num_labels)
        if self.num_labels not in (1, 2):
            raise RerankerLoadError(f"rerank.model: {spec.model!r} has {self.num_labels} labels; the "
                                    "cross_encoder backend needs 1 (relevance logit) or 2 (label 1 = "
                                    "relevant)")
        self.tokenizer = hf.load_processor(AutoTokenizer, spec)
        hf.check_tokenizer(self.tokenizer, self.model.config, spec.model)
        self.max_length = hf.text_max_length(spec.max_length, self.tokenizer, self.model.config)

    def _score(self, queries: Sequence[str], images: Sequence[Image.Image | None],
               captions: Sequence[str | None]) -> np.ndarray:
        import torch

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
