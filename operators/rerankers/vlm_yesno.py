"""``vlm_yesno`` backend: a multimodal LLM answers "is this image relevant?"; score = P(positive token).

One generic scorer for any transformers image-text-to-text model (``AutoProcessor`` +
``AutoModelForImageTextToText``: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA, Idefics3/SmolVLM, ...). For each
(query, image[, caption]) pair it

1. formats the prompt (:meth:`VlmYesNoReranker.build_prompt`): ``rerank.prompt`` with ``{query}`` and
   ``{caption}`` when ``use_caption`` is on and the candidate has a caption, otherwise the caption-free
   prompt (``prompt_no_caption``; a custom ``prompt`` without a ``{caption}`` placeholder is used as is).
   The default prompts are RagVL's (arXiv 2407.21439). Literal braces in a prompt are written ``{{ }}``;
2. puts the image and that text in one user turn of the processor's chat template with the generation
   prompt appended (:meth:`VlmYesNoReranker.build_text`); a processor without a chat template gets
   ``"<image token>\\n<prompt>"`` (Qwen-style vocabularies get the token between their vision markers);
3. runs ONE forward pass per batch (no ``generate``), left-padded so that the next-token position is the
   last one of every row (only that position's logits are computed when the model supports
   ``logits_to_keep``; otherwise the last non-pad position is gathered);
4. returns ``softmax([logit(positive), logit(negative)])[0]`` = P(positive | the two), in [0, 1].

``positive_token`` / ``negative_token`` are words, each resolved once to ONE vocabulary id: the word's
own encoding when it is a single token, else an exact vocabulary entry (so raw tokens such as ``▁Yes`` or
``ĠYes`` can be named), else the encoding with a leading space; a word that only encodes to several
tokens uses its first token (with a warning); a word that encodes to the unknown token, or two words
that resolve to the same id, fail at load time with :class:`RerankerLoadError`.

Config examples (``rerank:`` section)::

    # RagVL-style (knowledge-enhanced reranker, arXiv 2407.21439): Yes/No, caption in the prompt
    rerank: {backend: vlm_yesno, model: /models/ragvl-reranker, positive_token: "Yes",
             negative_token: "No", use_caption: true}

    # MonoQwen2-VL-v0.1 (LoRA adapter on Qwen2-VL-2B-Instruct, MonoT5 objective): True/False
    rerank:
      backend: vlm_yesno
      model: Qwen/Qwen2-VL-2B-Instruct
      lora_adapter: lightonai/MonoQwen2-VL-v0.1     # needs `pip install peft`
      prompt: "Assert the relevance of the previous image document to the following query, answer True or False. The query is: {query}"
      positive_token: "True"
      negative_token: "False"
      use_caption: false

    # Qwen3-VL-Reranker (yes/no, lower case; its system prompt goes in spec.extra["system_prompt"])
    rerank:
      backend: vlm_yesno
      model: Qwen/Qwen3-VL-Reranker-2B
      prompt: "<Instruct>: Given a search query, retrieve relevant candidates that answer the query.<Query>:{query}\\n<Document>:"
      positive_token: "yes"
      negative_token: "no"
      use_caption: false

    # any "relevancy score" model fine-tuned to answer one of two words, e.g. Relevant/Irrelevant
    rerank: {backend: vlm_yesno, model: s3://bucket/models/my-vlm, positive_token: "Relevant",
             negative_token: "Irrelevant", prompt: "Query: {query}\\nCaption: {caption}\\nRelevant or Irrelevant?"}

Optional ``spec.extra`` keys: ``system_prompt`` (a system turn before the user turn, e.g. Qwen3-VL-Reranker's
"Judge whether the Document meets the requirements based on the Query and the Instruct provided. Note
that the answer can only be \\"yes\\" or \\"no\\"."), ``image_position`` (``"first"``, the default, or
``"last"``: the image after the text, as Qwen3-VL-Reranker's ``<Document>:`` slot expects) and
``processor_kwargs`` (passed to the processor call, e.g. ``{"size": {"shortest_edge": 3136,
"longest_edge": 401408}}`` to bound the pixels, hence the image tokens, of Qwen-VL processors). ``max_length`` caps the query and the caption at that many tokens each
(image tokens are bounded by the processor's image settings, never truncated: a cut image breaks the model).

On ``cuda`` the model runs in ``precision`` (fp16/bf16) through :func:`operators.rerankers.hf.load_model`,
which also enforces safetensors, a pinned ``revision`` with ``trust_remote_code`` and applies
``lora_adapter`` with peft (merged); scores are computed in fp32 from the two logits.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from operators.rerankers.base import Reranker, RerankerLoadError, RerankerSpec, register
from operators.rerankers.hf import load_model, load_processor

log = logging.getLogger(__name__)


def resolve_token_id(tokenizer: Any, word: str, field: str = "positive_token") -> int:
    """One vocabulary id for ``word`` (see the module docstring for the order tried)."""
    if not isinstance(word, str) or not word.strip():
        raise RerankerLoadError(f"rerank.{field}: must be a non-empty word, got {word!r}")
    unk = getattr(tokenizer, "unk_token_id", None)

    def known(ids: list[int]) -> bool:
        return bool(ids) and (unk is None or unk not in ids)

    plain = list(tokenizer.encode(word, add_special_tokens=False))
    if len(plain) == 1 and known(plain):
        return int(plain[0])
    vocab = tokenizer.get_vocab()
    if word in vocab and vocab[word] != unk:
        return int(vocab[word])
    spaced = list(tokenizer.encode(" " + word, add_special_tokens=False))
    if len(spaced) == 1 and known(spaced):
        return int(spaced[0])
    if plain and (unk is None or plain[0] != unk):
        log.warning("rerank.%s: %r is %d tokens %s for this tokenizer; scoring its first token %r only",
                    field, word, len(plain), tokenizer.convert_ids_to_tokens(plain),
                    tokenizer.convert_ids_to_tokens(plain[0]))
        return int(plain[0])
    raise RerankerLoadError(f"rerank.{field}: {word!r} is not in the tokenizer's vocabulary "
                            f"(it encodes to {tokenizer.convert_ids_to_tokens(plain) or 'nothing'})")


@register("vlm_yesno")
class VlmYesNoReranker(Reranker):
    """P(positive token) of an image-text-to-text model, one forward pass per batch of pairs."""

    needs_image = True
    needs_caption = False
    needs_model = True

    def __init__(self, spec: RerankerSpec, device: str = "cpu", precision: str = "fp32") -> None:
        super().__init__(spec, device, precision)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = load_processor(AutoProcessor, spec)
        tok = getattr(self.processor, "tokenizer", None)
        if tok is None or getattr(self.processor, "image_processor", None) is None:
            raise RerankerLoadError(f"rerank.model: {spec.model!r} has no image processor + tokenizer "
                                    f"(got {type(self.processor).__name__}); vlm_yesno needs an "
                                    "image-text-to-text model")
        self.tokenizer = tok
        tok.padding_side = "left"  # the next-token position is then the last one of every row
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        self.pos_id = resolve_token_id(tok, spec.positive_token, "positive_token")
        self.neg_id = resolve_token_id(tok, spec.negative_token, "negative_token")
        if self.pos_id == self.neg_id:
            raise RerankerLoadError(f"rerank.positive_token {spec.positive_token!r} and negative_token "
                                    f"{spec.negative_token!r} resolve to the same token id {self.pos_id}")
        self.system_prompt: str | None = spec.extra.get("system_prompt")
        position = spec.extra.get("image_position", "first")
        if position not in ("first", "last"):
            raise ValueError(f"rerank.extra.image_position: 'first' or 'last', got {position!r}")
        self.image_last = position == "last"
        self.processor_kwargs: dict[str, Any] = dict(spec.extra.get("processor_kwargs") or {})
        self.model = load_model(AutoModelForImageTextToText, spec, device, precision)
        head = self.model.get_output_embeddings()
        vocab_size = head.weight.shape[0] if head is not None else self.model.config.get_text_config().vocab_size
        if max(self.pos_id, self.neg_id) >= vocab_size:
            raise RerankerLoadError(f"rerank: token ids {self.pos_id}/{self.neg_id} are outside the model's "
                                    f"output vocabulary ({vocab_size})")
        self._keep_last = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        log.info("vlm_yesno: %s, positive %r -> %d, negative %r -> %d, chat template: %s",
                 type(self.model).__name__, spec.positive_token, self.pos_id, spec.negative_token,
                 self.neg_id, self.has_chat_template)

    # ------------------------------------------------------------------------------------------
    # prompt construction (public so that tests and users can see exactly what the model reads)
    # ------------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.processor, "chat_template", None))

    def _clip(self, text: str) -> str:
        """``text`` cut to at most ``spec.max_length`` tokens (on a token boundary)."""
        n = self.spec.max_length
        if len(text.encode("utf-8")) <= n:  # a token covers at least one byte
            return text
        try:
            enc = self.tokenizer(text, add_special_tokens=False, truncation=True, max_length=n,
                                 return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
        except (NotImplementedError, TypeError, ValueError, KeyError):  # slow tokenizer: no offsets
            return text
        return text[:offsets[-1][1]] if len(enc["input_ids"]) >= n and offsets else text

    def build_prompt(self, query: str, caption: str | None = None) -> str:
        """The instruction text for one pair (before the chat template)."""
        spec = self.spec
        with_caption = spec.use_caption and isinstance(caption, str) and caption.strip() != ""
        if with_caption or "{caption}" not in spec.prompt:
            template = spec.prompt
        else:
            template = spec.prompt_no_caption
        return template.format(query=self._clip(query), caption=self._clip(caption) if with_caption else "")

    def build_text(self, prompt: str) -> str:
        """The full model input text for one pair: chat template + generation prompt, image slot included."""
        if self.has_chat_template:
            content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
            content.insert(len(content) if self.image_last else 0, {"type": "image"})
            messages: list[dict[str, Any]] = []
            if self.system_prompt:
                messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
            messages.append({"role": "user", "content": content})
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return text if isinstance(text, str) else text[0]
        image_token = getattr(self.processor, "image_token", None) or "<image>"
        vocab = self.tokenizer.get_vocab()
        if "<|vision_start|>" in vocab and "<|vision_end|>" in vocab:  # Qwen-VL family without a template
            image_token = f"<|vision_start|>{image_token}<|vision_end|>"
        head = f"{self.system_prompt}\n" if self.system_prompt else ""
        return f"{head}{prompt}\n{image_token}" if self.image_last else f"{head}{image_token}\n{prompt}"

    # ------------------------------------------------------------------------------------------
    # scoring
    # ------------------------------------------------------------------------------------------

    def _score(self, queries: Sequence[str], images: Sequence[Image.Image | None],
               captions: Sequence[str | None]) -> np.ndarray:
        import torch

        texts = [self.build_text(self.build_prompt(q, c)) for q, c in zip(queries, captions, strict=True)]
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]  # type: ignore[union-attr]
        enc = self.processor(text=texts, images=rgb, padding=True, return_tensors="pt", **self.processor_kwargs)
        dtype = self.model.dtype
        inputs = {k: (v.to(self.device, dtype=dtype) if v.is_floating_point() else v.to(self.device))
                  if isinstance(v, torch.Tensor) else v for k, v in enc.items()}
        mask = inputs.get("attention_mask")
        left_padded = mask is None or bool(mask[:, -1].all())
        with torch.inference_mode():
            if left_padded and self._keep_last:
                logits = self.model(**inputs, logits_to_keep=1).logits[:, -1]
            else:
                logits = self.model(**inputs).logits
                if left_padded or logits.shape[1] != mask.shape[1]:
                    logits = logits[:, -1]
                else:  # right-padded despite padding_side: the last non-pad position of each row
                    pos = torch.arange(mask.shape[1], device=mask.device)
                    last = (mask.to(torch.long) * pos).argmax(dim=1)
                    logits = logits[torch.arange(len(texts), device=logits.device), last]
            pair = logits[:, [self.pos_id, self.neg_id]].float()
            p = torch.softmax(pair, dim=-1)[:, 0]
        return p.cpu().numpy().astype(np.float32)
