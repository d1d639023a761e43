"""A tiny Qwen2-VL (random init, built offline) whose word-level vocabulary covers the synthetic sample and
the RagVL prompts: what ``python -m pipelines.pretrain`` starts the shipped reranker base from, and a
random-init base for users who want to train from scratch (``save_tiny_vlm(dir)``, then ``train.model: dir``).

No chat template: the ``vlm_yesno`` backend then feeds ``<|vision_start|><|image_pad|><|vision_end|>\\n
<prompt>`` and reads the answer at the next position. Images of 64 px cost 4 image tokens.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from operators.rerankers.base import RAGVL_PROMPT, RAGVL_PROMPT_CAPTION

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "[UNK]"]
ANSWER_WORDS = ("Yes", "No", "yes", "no", "True", "False")


def sample_words() -> list[str]:
    """Every word of the sample's captions and query templates and of the RagVL prompts."""
    from pipelines.sample import BACKGROUNDS, COLORS, QUERY_TEMPLATES, SHAPES

    text = " ".join([*QUERY_TEMPLATES, RAGVL_PROMPT, RAGVL_PROMPT_CAPTION, "a an and on background"])
    words = set(re.findall(r"[A-Za-z]+", text)) | set(COLORS) | set(BACKGROUNDS) | set(SHAPES)
    words |= set(ANSWER_WORDS)
    return sorted(words) + list(":?.,'!{}")


def build_processor(words: list[str]) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + [w for w in words if w not in SPECIAL_TOKENS])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="<|endoftext|>",
                                  eos_token="<|im_end|>")
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56),
                            tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=None)


def save_tiny_vlm(path: str | Path, seed: int = 0, hidden: int = 64, layers: int = 2,
                  init_std: float = 0.02) -> Path:
    """Write the tiny base (safetensors + processor) to ``path``; same arguments give the same weights."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    path = Path(path)
    processor = build_processor(sample_words())
    v = processor.tokenizer.get_vocab()
    half = hidden // 4 // 2  # rotary half-dimension of a head (4 heads): M-RoPE splits it t/h/w as 1:1:2
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(v), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=init_std,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half // 4, half // 4, half // 2]},
                         bos_token_id=v["<|endoftext|>"], eos_token_id=v["<|im_end|>"],
                         pad_token_id=v["<|endoftext|>"]),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=v["<|image_pad|>"], video_token_id=v["<|video_pad|>"],
        vision_start_token_id=v["<|vision_start|>"], vision_end_token_id=v["<|vision_end|>"])
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(cfg).eval().save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path
