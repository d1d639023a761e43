"""A tiny, random-initialised Qwen2-VL (model + processor) built fully offline, for reranker tests.

The tokenizer is a word-level ``tokenizers`` model over a small vocabulary: Qwen2-VL's chat-template
special tokens, the answer words (Yes/No/True/False/yes/no), the words of the RagVL prompts and a few
test words; anything else is ``[UNK]``. The processor carries Qwen2-VL's chat template and an image
processor bounded to a few patches, so 28-64 px images cost 1-4 image tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "[UNK]"]
WORDS = ("Yes No True False yes no system user assistant You are a helpful Image Caption Question Based on "
         "the image and its caption is relevant to question Answer or Is Assert relevance of previous document "
         "following query answer The red blue green cat dog car tree photo small big with").split()
PUNCT = list(":?.,'!")

# Qwen2-VL-Instruct's chat template.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + WORDS + PUNCT)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>")


def build_processor(chat_template: str | None = QWEN2_VL_CHAT_TEMPLATE) -> Any:
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56),
                            tokenizer=build_tokenizer(), video_processor=Qwen2VLVideoProcessor(),
                            chat_template=chat_template)


def build_model(tokenizer: Any, seed: int = 0, init_std: float = 0.2) -> Any:
    """A ~90k-parameter Qwen2-VL; weights drawn wider than usual (``init_std``) so that the answer
    logits depend on the input and P(Yes) spreads over (0, 1) instead of sitting at one value."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    v = tokenizer.get_vocab()
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(v), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=init_std,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
                         bos_token_id=v["<|endoftext|>"], eos_token_id=v["<|im_end|>"],
                         pad_token_id=v["<|endoftext|>"]),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=v["<|image_pad|>"], video_token_id=v["<|video_pad|>"],
        vision_start_token_id=v["<|vision_start|>"], vision_end_token_id=v["<|vision_end|>"])
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(cfg).eval()


def save_tiny_vlm(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny Qwen2-VL checkpoint (safetensors) + processor to ``path``; returns ``path``."""
    path = Path(path)
    processor = build_processor()
    build_model(processor.tokenizer, seed=seed).save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path
