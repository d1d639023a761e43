"""``clip`` backend: re-score with a second (usually larger) open_clip model: cosine(image, query)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from operators.models import build_model, image_transform
from operators.rerankers.base import Reranker, RerankerSpec, distinct_images, register


@register("clip")
class ClipReranker(Reranker):
    needs_image = True
    needs_model = False  # its model is rerank.clip_model (open_clip), not an HF rerank.model

    def __init__(self, spec: RerankerSpec, device: str = "cpu", precision: str = "fp32") -> None:
        super().__init__(spec, device, precision)
        if spec.clip_model is None:
            raise ValueError("rerank.clip_model: the clip backend needs a model")
        self.model, self.tokenizer = build_model(spec.clip_model, device, precision)
        self.transform = image_transform(spec.clip_model.preprocess)

    def _score(self, queries: Sequence[str], images: Sequence[Image.Image | None],
               captions: Sequence[str | None]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        # Encode each distinct image once (pairs of one doc share the decoded image object).
        uniq_images, img_pos = distinct_images(images)  # type: ignore[arg-type] - score() checked for None
        x = torch.stack([self.transform(im) for im in uniq_images]).to(self.device)
        if self.device == "cuda" and self.precision in ("fp16", "bf16"):
            x = x.to(torch.bfloat16 if self.precision == "bf16" else torch.float16)
        with torch.inference_mode():
            # Encode each distinct query once: a batch is usually many docs of few queries.
            uniq = sorted(set(queries))
            t = F.normalize(self.model.encode_text(self.tokenizer(uniq).to(self.device)).float(), dim=-1)
            pos = {q: i for i, q in enumerate(uniq)}
            v = F.normalize(self.model.encode_image(x).float(), dim=-1)[img_pos]
            s = (v * t[[pos[q] for q in queries]]).sum(-1)
        return s.cpu().numpy().astype(np.float32)
