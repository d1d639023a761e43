"""``blip_itm`` backend: BLIP's image-text matching head, P(match | image, query).

``spec.model`` is a ``BlipForImageTextRetrieval`` checkpoint with its processor (for example
``Salesforce/blip-itm-base-coco``). The score of a pair is ``softmax(itm_score)[:, 1]`` from the ITM
head (``use_itm_head=True``), in [0, 1]. The query is the text side; captions are ignored. Every pair
needs an image: a pair without one raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from operators.rerankers import hf
from operators.rerankers.base import Reranker, RerankerLoadError, RerankerSpec, register


@register("blip_itm")
class BlipItmReranker(Reranker):
    needs_image = True
    needs_caption = False

    def __init__(self, spec: RerankerSpec, device: str = "cpu", precision: str = "fp32") -> None:
        super().__init__(spec, device, precision)
        from transformers import AutoProcessor, BlipForImageTextRetrieval

        self.model = hf.load_model(BlipForImageTextRetrieval, spec, device,
                                   precision)
        self.processor = hf.load_processor(AutoProcessor, spec)
        if not (hasattr(self.processor, "image_processor") and hasattr(self.processor, "tokenizer")):
            raise RerankerLoadError(f"rerank.model: {spec.model!r} has no image processor config (got a "
                                    f"{type(self.processor).__name__}); blip_itm needs a BLIP processor")
        text_config = self.model.config.text_config
        hf.check_tokenizer(self.processor.tokenizer, text_config, spec.model)
        self.max_length = hf.text_max_length(spec.max_length, self.processor.tokenizer, text_config)
        self.dtype = next(self.model.parameters()).dtype

    def score(self, queries: Sequence[str], images: Sequence[Image.Image | None],
              captions: Sequence[str | None]) -> np.ndarray:
        import torch

        if len(queries) != len(images):
            raise ValueError(f"blip_itm: {len(queries)} queries but {len(images)} images")
        for i, (q, im) in enumerate(zip(queries, images, strict=True)):
            if im is None:
                raise ValueError(f"blip_itm reranker needs an image for every pair (pair {i} has none)")
            if q is None:
                raise ValueError(f"blip_itm: pair {i} has no query text")
        if not queries:
            return np.zeros(0, dtype=np.float32)
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        enc = self.processor(images=rgb, text=list(queries), padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        pixel_values = enc["pixel_values"].to(self.device, dtype=self.dtype)
        with torch.inference_mode():
            out = self.model(input_ids=enc["input_ids"].to(self.device), pixel_values=pixel_values,
                             attention_mask=enc["attention_mask"].to(self.device), use_itm_head=True)
            s = torch.softmax(out.itm_score.float(), dim=-1)[:, 1]
        return s.cpu().numpy().astype(np.float32)
