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

Prefix sharing (``rerank.prefix_sharing``, :meth:`VlmYesNoReranker._score_shared`): the rerank stage hands a
backend whole docs, so one ``score`` call holds several queries per doc image. With the image first in the
prompt, every pair of a doc starts with the same tokens (system turn, image, caption when the template puts
it before the query). Those tokens are run ONCE per (image, caption) group in a ``score`` call: the vision
encoder once per distinct image, the shared prefix once into a KV cache (``DynamicCache``); the cache is then
expanded along the batch (``batch_select_indices``) and only each pair's own tokens (the query and the rest
of the template) are run against it, all pairs of the call in one batch. The prefix is the longest common
token prefix of the group's own full tokenizations (cut one token short of the shortest, so each pair keeps
its last token), so the concatenation is each pair's exact input and, attention being causal, the shared
keys/values are the ones the full sequence computes. Positions: the prefixes' 3-D M-RoPE ids come from the
model's ``get_rope_index`` (left-padded batch, the image's rope delta per prefix); a suffix token at index
``t`` of the full sequence gets ``t + delta`` on all three axes, exactly as ``get_rope_index`` gives text
after the image. Suffixes are left-padded (pads sit between the prefix and the suffix, masked out), so the
answer logit is read at each row's own last real token. ``auto`` uses it for Qwen2-VL, Qwen2.5-VL and
Qwen3-VL with the image first (and falls back to the per-pair path elsewhere, with one log line saying why),
``on`` raises at construction where it cannot, ``off`` is the per-pair path (the reference).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from operators.rerankers.base import Reranker, RerankerLoadError, RerankerSpec, distinct_images, register
from operators.rerankers.hf import load_model, load_processor

log = logging.getLogger(__name__)

PREFIX_SHARING_MODES = ("auto", "on", "off")
# ``config.model_type``s whose prefix cache can be shared: M-RoPE from ``model.model.get_rope_index``, image
# features passed to ``forward`` as ``mm_encoder_outputs`` (Qwen3-VL's deepstack features included).
PREFIX_SHARING_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


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
        token = getattr(self.processor, "image_token", None)
        image_ids = tok.encode(token, add_special_tokens=False) if isinstance(token, str) else []
        self._image_id: int | None = int(image_ids[0]) if len(image_ids) == 1 else None
        mode = spec.prefix_sharing
        if mode not in PREFIX_SHARING_MODES:
            raise ValueError(f"rerank.prefix_sharing: 'auto', 'on' or 'off', got {mode!r}")
        why_not = None if mode == "off" else self.prefix_sharing_unsupported()
        if why_not is not None and mode == "on":
            raise ValueError(f"rerank.prefix_sharing: on, but {why_not}; set rerank.prefix_sharing to auto "
                             "(scores each pair with its full prompt where sharing is unsupported) or off")
        if why_not is not None:
            log.info("vlm_yesno: rerank.prefix_sharing auto: per-pair scoring, %s", why_not)
        self.prefix_sharing = mode != "off" and why_not is None
        self._checked_model = self.model  # the model the check passed for (training swaps in a peft-wrapped one)
        log.info("vlm_yesno: %s, positive %r -> %d, negative %r -> %d, chat template: %s, prefix sharing: %s",
                 type(self.model).__name__, spec.positive_token, self.pos_id, spec.negative_token,
                 self.neg_id, self.has_chat_template, self.prefix_sharing)

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
        if self.prefix_sharing and self.model is self._checked_model:  # another model: the per-pair path
            return self._score_shared(queries, images, captions)  # type: ignore[arg-type] - score() checked
        return self._score_pairs(queries, images, captions)

    def _score_pairs(self, queries: Sequence[str], images: Sequence[Image.Image | None],
                     captions: Sequence[str | None]) -> np.ndarray:
        """The per-pair path (the reference): each pair's full prompt, one left-padded forward pass."""
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

    # ------------------------------------------------------------------------------------------
    # prefix sharing: each doc image's vision pass and prompt prefix once per call (module docstring)
    # ------------------------------------------------------------------------------------------

    def prefix_sharing_unsupported(self) -> str | None:
        """Why this model/prompt layout cannot share prefixes (``None``: it can)."""
        if self.image_last:
            return ("the image comes after the query (rerank.options.image_position: last), so no "
                    "query-independent prompt prefix holds the image")
        model_type = getattr(self.model.config, "model_type", None)
        if model_type not in PREFIX_SHARING_MODEL_TYPES:
            return (f"{type(self.model).__name__} (model_type {model_type!r}) is not one of the supported "
                    f"architectures ({', '.join(PREFIX_SHARING_MODEL_TYPES)})")
        if any("lora_" in name for name, _ in self.model.named_parameters()):
            return "the model carries an unmerged LoRA adapter"  # load_model merges; a wrapped model does not
        inner = getattr(self.model, "model", None)
        if not (callable(getattr(inner, "get_rope_index", None))
                and callable(getattr(self.model, "get_image_features", None))):
            return f"{type(self.model).__name__} has no get_rope_index / get_image_features in this transformers"
        params = inspect.signature(self.model.forward).parameters
        missing = [p for p in ("mm_encoder_outputs", "past_key_values", "position_ids", "logits_to_keep")
                   if p not in params]
        if missing:
            return f"{type(self.model).__name__}.forward takes no {', '.join(missing)} in this transformers"
        attn = getattr(self.model.config, "_attn_implementation", None)
        if attn not in ("sdpa", "eager"):
            return f"attention implementation {attn!r} (only sdpa and eager are supported with padded caches)"
        if self._image_id is None:
            return f"the processor's image token {getattr(self.processor, 'image_token', None)!r} is not a single token"
        # The path tokenizes texts itself and expands the image token; it must give the processor's exact ids.
        try:
            probe = Image.new("RGB", (56, 56), (127, 96, 64))
            text = self.build_text(self.build_prompt("probe query", "probe caption"))
            want = self.processor(text=[text], images=[probe], return_tensors="pt",
                                  **self.processor_kwargs)["input_ids"][0].tolist()
            ids = self._token_ids([text])[0]
            k = ids.index(self._image_id)  # type: ignore[arg-type]
            n = self._image_token_counts(self._image_inputs([probe])["image_grid_thw"])[0]
            got = ids[:k] + ids[k:k + 1] * n + ids[k + 1:]
        except Exception as e:  # noqa: BLE001 - any failure means: not supported
            return f"the probe pair failed to tokenize ({type(e).__name__}: {e})"
        if got != want:
            return "its own tokenization of a probe pair differs from the processor's input ids"
        return None

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        """The texts' token ids as the processor's tokenizer call makes them, the image slot one token."""
        return [list(x) for x in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]

    def _image_inputs(self, images: Sequence[Image.Image]) -> Any:
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        return self.processor(images=rgb, return_tensors="pt", **self.processor_kwargs)

    def _image_token_counts(self, grid: Any) -> list[int]:
        merge = int(self.model.config.vision_config.spatial_merge_size)
        return [int(g.prod()) // merge ** 2 for g in grid]

    def _shared_plan(self, ids: list[list[int]], images: Sequence[Image.Image],
                     captions: Sequence[str | None]) -> tuple[list[tuple[list[int], int, int, int]], list[int],
                                                              list[Image.Image]]:
        """Groups of pairs sharing a prefix: ``(pairs, image index, prefix length, image slot)`` in unexpanded
        token ids, the pairs left to the per-pair path, and the distinct images the groups use."""
        image_id = self._image_id
        video_id = getattr(self.processor, "video_token_id", None)
        uniq, img_of = distinct_images(images)
        groups: dict[tuple[int, str | None], list[int]] = {}
        alone: list[int] = []
        for i, seq in enumerate(ids):
            if seq.count(image_id) != 1 or (video_id is not None and video_id in seq):
                alone.append(i)  # e.g. an image token typed into a query: the processor's own path
                continue
            groups.setdefault((img_of[i], captions[i] if self.spec.use_caption else None), []).append(i)
        plan: list[tuple[list[int], int, int, int]] = []
        used: dict[int, int] = {}
        for (u, _), rows in groups.items():
            seqs = [ids[i] for i in rows]
            first, shortest = seqs[0], min(len(s) for s in seqs)
            n = shortest - 1  # every pair keeps at least its last token (its answer logit) in the suffix
            for s in seqs[1:]:
                n = next((j for j in range(n) if s[j] != first[j]), n)
            k = first.index(image_id)  # type: ignore[arg-type]
            if n <= k:  # the image is not inside the shared prefix (e.g. a query before it)
                alone.extend(rows)
                continue
            plan.append((rows, used.setdefault(u, len(used)), n, k))
        return plan, sorted(alone), [uniq[u] for u in sorted(used, key=used.__getitem__)]

    def _score_shared(self, queries: Sequence[str], images: Sequence[Image.Image],
                      captions: Sequence[str | None]) -> np.ndarray:
        """Scores equal to :meth:`_score_pairs`', each (image, caption) prefix computed once (module docstring)."""
        import torch

        texts = [self.build_text(self.build_prompt(q, c)) for q, c in zip(queries, captions, strict=True)]
        ids = self._token_ids(texts)
        plan, alone, used_images = self._shared_plan(ids, images, captions)
        if all(len(rows) == 1 for rows, _, _, _ in plan) and len(used_images) == len(plan):
            # nothing to share (each image scored once, e.g. one query over many docs): one forward, not two
            return self._score_pairs(queries, images, captions)
        out = np.full(len(texts), np.nan, dtype=np.float32)
        if alone:
            out[alone] = self._score_pairs([queries[i] for i in alone], [images[i] for i in alone],
                                           [captions[i] for i in alone])
        if not plan:
            return out
        dev, image_id = self.device, self._image_id
        pad = self.tokenizer.pad_token_id
        img = self._image_inputs(used_images)
        grid = img["image_grid_thw"]
        n_img = self._image_token_counts(grid)

        # 1. the prefixes (one row per group, left-padded), the vision encoder once per distinct image
        prefixes = [ids[rows[0]][:k] + [image_id] * n_img[u] + ids[rows[0]][k + 1:n]
                    for rows, u, n, k in plan]
        lp = max(len(p) for p in prefixes)
        p_ids = torch.full((len(plan), lp), pad, dtype=torch.long)
        p_mask = torch.zeros((len(plan), lp), dtype=torch.long)
        for g, p in enumerate(prefixes):
            p_ids[g, lp - len(p):] = torch.tensor(p)
            p_mask[g, lp - len(p):] = 1
        p_ids, p_mask = p_ids.to(dev), p_mask.to(dev)
        group_grid = grid[[u for _, u, _, _ in plan]].to(dev)
        positions, deltas = self.model.model.get_rope_index(
            p_ids, mm_token_type_ids=((p_ids == image_id) & p_mask.bool()).to(torch.int),
            image_grid_thw=group_grid, attention_mask=p_mask)
        with torch.inference_mode():
            feats = self.model.get_image_features(img["pixel_values"].to(dev, dtype=self.model.dtype),
                                                  grid.to(dev), return_dict=True)
            chosen = [u for _, u, _, _ in plan]  # the image of each prefix row, in row order
            per_group = type(feats)(**dict(feats.items()))
            per_group.pooler_output = tuple(feats.pooler_output[u] for u in chosen)
            if getattr(feats, "deepstack_features", None) is not None:  # Qwen3-VL
                per_group.deepstack_features = [tuple(layer[u] for u in chosen) for layer in feats.deepstack_features]
            cache = self.model(input_ids=p_ids, attention_mask=p_mask, position_ids=positions,
                               mm_encoder_outputs={"image": per_group}, use_cache=True,
                               logits_to_keep=1).past_key_values

            # 2. every pair's own tokens against its group's cache rows, left-padded: the last column is each
            #    row's last real token; positions continue the prefix's (index in the full sequence + delta)
            rows = [i for r, _, _, _ in plan for i in r]
            group_of = [g for g, (r, _, _, _) in enumerate(plan) for _ in r]
            suffixes = [ids[i][plan[g][2]:] for i, g in zip(rows, group_of, strict=True)]
            ls = max(len(s) for s in suffixes)
            s_ids = torch.full((len(rows), ls), pad, dtype=torch.long)
            s_mask = torch.zeros((len(rows), ls), dtype=torch.long)
            s_pos = torch.zeros((len(rows), ls), dtype=torch.long)
            nxt = [len(p) + int(d) for p, d in zip(prefixes, deltas.view(-1).tolist(), strict=True)]
            for r, (s, g) in enumerate(zip(suffixes, group_of, strict=True)):
                s_ids[r, ls - len(s):] = torch.tensor(s)
                s_mask[r, ls - len(s):] = 1
                s_pos[r] = nxt[g]  # pads: any position (masked out)
                s_pos[r, ls - len(s):] = nxt[g] + torch.arange(len(s))
            index = torch.tensor(group_of, dtype=torch.long, device=dev)
            cache.batch_select_indices(index)  # prefix rows -> one row per pair (a gather, no recompute)
            mask = torch.cat([p_mask[index], s_mask.to(dev)], dim=1)
            logits = self.model(input_ids=s_ids.to(dev), attention_mask=mask,
                                position_ids=s_pos.to(dev).unsqueeze(0).expand(3, -1, -1),
                                past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            pair = logits[:, [self.pos_id, self.neg_id]].float()
            p = torch.softmax(pair, dim=-1)[:, 0]
        out[rows] = p.cpu().numpy().astype(np.float32)
        return out
