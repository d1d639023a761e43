"""``blip_itm`` backend: BLIP's image-text matching head, P(match | image, query).

``spec.model`` is a ``BlipForImageTextRetrieval`` checkpoint with its processor (for example
``Salesforce/blip-itm-base-coco``). The score of a pair is ``softmax(itm_score)[:, 1]`` from the ITM
head (``use_itm_head=True``), in [0, 1]. The query is the text side; captions are ignored. The vision
encoder runs once per distinct image of a call (pairs of one doc share it). Every pair
needs an image: a pair without one raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from operators.rerankers import hf
from operators.rerankers.base import Reranker, RerankerLoadError, RerankerSpec, distinct_images, register


@register("blip_itm")
class BlipItmReranker(Reranker):
    needs_image = True
    needs_caption = False
    needs_model = True

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

    def _score(self, queries: Sequence[str], images: Sequence[Image.Image | None],
               captions: Sequence[str | None]) -> np.ndarray:
        import torch

        # The image side once per distinct image: pairs of one doc share its decoded image object, so BLIP's
        # vision encoder runs once per doc and only the text encoder (cross-attending to it) runs per pair.
        uniq, img_pos = distinct_images(images)  # type: ignore[arg-type] - score() checked for None
        uniq = [im if im.mode == "RGB" else im.convert("RGB") for im in uniq]
        enc = self.processor(images=uniq, text=list(queries), padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        pixel_values = enc["pixel_values"].to(self.device, dtype=self.dtype)
        which = torch.tensor(img_pos, device=self.device)
        with torch.inference_mode():
            # BlipForImageTextRetrieval.forward(use_itm_head=True), with the vision output indexed per pair.
            image_embeds = self.model.vision_model(pixel_values=pixel_values).last_hidden_state[which]
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            question = self.model.text_encoder(input_ids=enc["input_ids"].to(self.device),
                                               attention_mask=enc["attention_mask"].to(self.device),
                                               encoder_hidden_states=image_embeds,
                                               encoder_attention_mask=image_atts).last_hidden_state
            itm = self.model.itm_head(question[:, 0, :])
            s = torch.softmax(itm.float(), dim=-1)[:, 1]
        return s.cpu().numpy().astype(np.float32)
