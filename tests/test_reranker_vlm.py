"""``vlm_yesno`` reranker on a tiny random Qwen2-VL saved to disk and loaded through the real loader."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from operators.rerankers.base import (
    RAGVL_PROMPT,
    RAGVL_PROMPT_CAPTION,
    RerankerLoadError,
    RerankerSpec,
    create,
)
from operators.rerankers.vlm_yesno import VlmYesNoReranker, resolve_token_id
from tests.tiny_vlm import build_tokenizer, save_tiny_vlm

MONO_PROMPT = "Assert the relevance of the previous document to the following query, answer True or False. {query}"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vlm(tmp_path_factory.mktemp("tiny-qwen2-vl") / "model")


def _image(seed: int, h: int, w: int, mode: str = "RGB") -> Image.Image:
    arr = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.fixture(scope="module")
def pairs() -> tuple[list[str], list[Image.Image], list[str | None]]:
    """Pairs of different image sizes (1-4 image tokens) and text lengths: rows pad differently."""
    queries = ["red cat", "a small blue car with a big dog", "tree", "green photo of the cat", "dog"]
    images = [_image(0, 28, 28), _image(1, 56, 56), _image(2, 40, 64), _image(3, 30, 50, "L"), _image(4, 64, 30)]
    captions: list[str | None] = ["a red cat", None, "a big green tree with a small dog and a blue car", None, "dog"]
    return queries, images, captions


def _spec(model_dir: Path, **kw: Any) -> RerankerSpec:
    return RerankerSpec(backend="vlm_yesno", model=str(model_dir), **kw)


class Reference:
    """An independent, unbatched computation: own load, own prompt, one forward per pair."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, use_safetensors=True).eval()

    def text(self, prompt: str) -> str:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def scores(self, prompts: list[str], images: list[Image.Image], pos: str, neg: str) -> np.ndarray:
        vocab = self.processor.tokenizer.get_vocab()
        out = []
        for prompt, im in zip(prompts, images, strict=True):
            enc = self.processor(text=[self.text(prompt)], images=[im.convert("RGB")], return_tensors="pt")
            with torch.inference_mode():
                logits = self.model(**enc).logits[0, -1]
            out.append(torch.softmax(logits[[vocab[pos], vocab[neg]]], dim=-1)[0].item())
        return np.asarray(out, dtype=np.float32)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Reference:
    return Reference(model_dir)


@pytest.fixture(scope="module")
def reranker(model_dir: Path) -> VlmYesNoReranker:
    r = create(_spec(model_dir))
    assert isinstance(r, VlmYesNoReranker)
    return r


def _ragvl_prompts(queries: list[str], captions: list[str | None]) -> list[str]:
    return [RAGVL_PROMPT_CAPTION.format(query=q, caption=c) if c else RAGVL_PROMPT.format(query=q)
            for q, c in zip(queries, captions, strict=True)]


# ----------------------------------------------------------------------------------------------
# (1) fidelity: batched + padded scores == unbatched reference
# ----------------------------------------------------------------------------------------------


def test_batched_scores_match_unbatched_reference(reranker: VlmYesNoReranker, reference: Reference,
                                                  pairs: Any) -> None:
    queries, images, captions = pairs
    got = reranker.score(queries, images, captions)
    want = reference.scores(_ragvl_prompts(queries, captions), images, "Yes", "No")
    assert got.dtype == np.float32 and got.shape == (len(queries),)
    assert np.all((got >= 0) & (got <= 1))
    assert got.std() > 0.01, f"scores too close together for the check to mean anything: {got}"
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # every sub-batch (other padding) gives the same scores, and each pair alone too
    np.testing.assert_allclose(reranker.score(queries[1:4], images[1:4], captions[1:4]), want[1:4], atol=1e-5, rtol=0)
    for i in range(len(queries)):
        np.testing.assert_allclose(reranker.score([queries[i]], [images[i]], [captions[i]]), want[i:i + 1],
                                   atol=1e-5, rtol=0)


def test_left_padding_and_last_position_only(reranker: VlmYesNoReranker, pairs: Any) -> None:
    queries, images, captions = pairs
    texts = [reranker.build_text(reranker.build_prompt(q, c)) for q, c in zip(queries, captions, strict=True)]
    enc = reranker.processor(text=texts, images=images, padding=True, return_tensors="pt")
    mask = enc["attention_mask"]
    assert bool(mask[:, -1].all()) and not bool(mask.all()), "rows must be left-padded to different lengths"
    assert reranker._keep_last


def test_right_padding_is_gathered_correctly(model_dir: Path, reference: Reference, pairs: Any) -> None:
    """A processor that pads on the right anyway: the last non-pad position is used, same scores."""
    queries, images, captions = pairs
    r = create(_spec(model_dir))
    r.tokenizer.padding_side = "right"
    np.testing.assert_allclose(r.score(queries, images, captions),
                               reference.scores(_ragvl_prompts(queries, captions), images, "Yes", "No"),
                               atol=1e-5, rtol=0)


def test_empty_batch_and_missing_image(reranker: VlmYesNoReranker) -> None:
    assert reranker.score([], [], []).shape == (0,)
    assert reranker.needs_image and not reranker.needs_caption
    with pytest.raises(ValueError, match="image"):
        reranker.score(["cat"], [None], [None])
    with pytest.raises(ValueError, match="queries"):
        reranker.score(["cat", "dog"], [_image(0, 28, 28)], [None])


# ----------------------------------------------------------------------------------------------
# (2) answer tokens
# ----------------------------------------------------------------------------------------------


def test_true_false_tokens_change_ids_and_scores(model_dir: Path, reranker: VlmYesNoReranker,
                                                 reference: Reference, pairs: Any) -> None:
    queries, images, captions = pairs
    vocab = reranker.tokenizer.get_vocab()
    assert (reranker.pos_id, reranker.neg_id) == (vocab["Yes"], vocab["No"])
    tf = create(_spec(model_dir, positive_token="True", negative_token="False"))
    assert (tf.pos_id, tf.neg_id) == (vocab["True"], vocab["False"])
    got = tf.score(queries, images, captions)
    assert not np.allclose(got, reranker.score(queries, images, captions), atol=1e-3)
    np.testing.assert_allclose(got, reference.scores(_ragvl_prompts(queries, captions), images, "True", "False"),
                               atol=1e-5, rtol=0)
    # swapping the two words gives the complementary probability
    swapped = create(_spec(model_dir, positive_token="No", negative_token="Yes"))
    np.testing.assert_allclose(swapped.score(queries, images, captions), 1 - reranker.score(queries, images, captions),
                               atol=1e-5)


def test_unknown_and_ambiguous_tokens(model_dir: Path) -> None:
    with pytest.raises(RerankerLoadError, match=r"positive_token: 'Zebra' is not in the tokenizer's vocabulary"):
        create(_spec(model_dir, positive_token="Zebra"))
    with pytest.raises(RerankerLoadError, match="negative_token"):
        create(_spec(model_dir, negative_token="Nope"))
    with pytest.raises(RerankerLoadError, match="same token id"):
        create(_spec(model_dir, positive_token="Yes", negative_token="Yes!"))
    with pytest.raises(RerankerLoadError, match="non-empty"):
        create(_spec(model_dir, positive_token=" "))


def test_resolve_token_id_rules(caplog: pytest.LogCaptureFixture) -> None:
    tok = build_tokenizer()
    vocab = tok.get_vocab()
    assert resolve_token_id(tok, "Yes") == vocab["Yes"]
    assert resolve_token_id(tok, " True ") == vocab["True"]  # the leading/trailing space is tolerated
    assert resolve_token_id(tok, "<|im_end|>") == vocab["<|im_end|>"]  # an exact vocabulary entry
    with caplog.at_level(logging.WARNING, logger="operators.rerankers.vlm_yesno"):
        assert resolve_token_id(tok, "Yes!", "positive_token") == vocab["Yes"]  # 2 tokens: the first one
    assert any("2 tokens" in r.getMessage() and "first token" in r.getMessage() for r in caplog.records)
    with pytest.raises(RerankerLoadError, match="not in the tokenizer's vocabulary"):
        resolve_token_id(tok, "Zebra yes")  # first token unknown


# ----------------------------------------------------------------------------------------------
# (3) prompts
# ----------------------------------------------------------------------------------------------


def test_build_prompt_caption_on_off(model_dir: Path, reranker: VlmYesNoReranker) -> None:
    assert reranker.build_prompt("red cat", "a red cat") == RAGVL_PROMPT_CAPTION.format(query="red cat",
                                                                                       caption="a red cat")
    assert reranker.build_prompt("red cat", None) == RAGVL_PROMPT.format(query="red cat")
    assert reranker.build_prompt("red cat", "  ") == RAGVL_PROMPT.format(query="red cat")
    off = create(_spec(model_dir, use_caption=False))
    assert off.build_prompt("red cat", "a red cat") == RAGVL_PROMPT.format(query="red cat")
    mono = create(_spec(model_dir, prompt=MONO_PROMPT, positive_token="True", negative_token="False"))
    assert mono.build_prompt("red cat", "a red cat") == MONO_PROMPT.format(query="red cat")
    assert mono.build_prompt("red cat", None) == MONO_PROMPT.format(query="red cat")
    # a query with braces is data, not a template
    assert "{caption}" in reranker.build_prompt("what is {caption}?", None)


def test_caption_reaches_the_model(model_dir: Path, reranker: VlmYesNoReranker, pairs: Any) -> None:
    queries, images, _ = pairs
    caps = ["a red cat with a dog"] * len(queries)
    with_cap = reranker.score(queries, images, caps)
    without = reranker.score(queries, images, [None] * len(queries))
    assert not np.allclose(with_cap, without, atol=1e-4)
    off = create(_spec(model_dir, use_caption=False))
    np.testing.assert_allclose(off.score(queries, images, caps), without, atol=1e-5, rtol=0)


def test_chat_text_and_fallback(model_dir: Path, tmp_path: Path, reranker: VlmYesNoReranker, pairs: Any) -> None:
    text = reranker.build_text("Question: cat?")
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Question: cat?<|im_end|>" in text
    sys_last = create(_spec(model_dir, extra={"system_prompt": "Answer yes or no.", "image_position": "last"}))
    text = sys_last.build_text("Question: cat?")
    assert text.startswith("<|im_start|>system\nAnswer yes or no.<|im_end|>\n")
    assert "Question: cat?<|vision_start|><|image_pad|><|vision_end|><|im_end|>" in text
    # a processor without a chat template: a plain "<image>\n<prompt>" text, still scored
    plain_dir = tmp_path / "no-template"
    shutil.copytree(model_dir, plain_dir)
    for name in ("chat_template.jinja", "chat_template.json"):
        (plain_dir / name).unlink(missing_ok=True)
    plain = create(_spec(plain_dir))
    assert not plain.has_chat_template
    assert plain.build_text("Question: cat?") == "<|vision_start|><|image_pad|><|vision_end|>\nQuestion: cat?"
    queries, images, captions = pairs
    s = plain.score(queries, images, captions)
    assert s.shape == (len(queries),) and np.isfinite(s).all()


def test_processor_kwargs_and_extra_validation(model_dir: Path, reranker: VlmYesNoReranker) -> None:
    im = _image(5, 56, 56)  # 4 image tokens by default, 1 when bounded to 28x28 pixels
    small = create(_spec(model_dir, extra={"processor_kwargs": {"size": {"shortest_edge": 784,
                                                                         "longest_edge": 784}}}))
    enc = small.processor(text=[small.build_text("cat")], images=[im], return_tensors="pt",
                          **small.processor_kwargs)
    assert enc["image_grid_thw"].tolist() == [[1, 2, 2]]
    s = small.score(["cat"], [im], [None])
    assert np.isfinite(s).all() and not np.allclose(s, reranker.score(["cat"], [im], [None]), atol=1e-5)
    with pytest.raises(ValueError, match="image_position"):
        create(_spec(model_dir, extra={"image_position": "middle"}))


def test_max_length_clips_query_and_caption(model_dir: Path) -> None:
    r = create(_spec(model_dir, max_length=3))
    p = r.build_prompt("red cat with a dog", "a big green tree with a dog")
    assert p == RAGVL_PROMPT_CAPTION.format(query="red cat with", caption="a big green")


# ----------------------------------------------------------------------------------------------
# (4) loading errors
# ----------------------------------------------------------------------------------------------


def test_load_errors(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RerankerLoadError, match="not found"):
        create(_spec(tmp_path / "missing"))
    with pytest.raises(RerankerLoadError, match="revision"):
        create(_spec(model_dir, trust_remote_code=True))
    no_weights = tmp_path / "no-weights"
    shutil.copytree(model_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(RerankerLoadError, match="cannot load"):
        create(_spec(no_weights))
    with pytest.raises(RerankerLoadError, match="lora_adapter"):
        create(_spec(model_dir, lora_adapter=str(tmp_path / "no-adapter")))


def test_lora_adapter_is_applied(model_dir: Path, tmp_path: Path, reranker: VlmYesNoReranker,
                                 pairs: Any) -> None:
    peft = pytest.importorskip("peft")
    from transformers import Qwen2VLForConditionalGeneration

    base = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, use_safetensors=True)
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(base, cfg)
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    queries, images, captions = pairs
    tuned = create(_spec(model_dir, lora_adapter=str(adapter)))
    got = tuned.score(queries, images, captions)
    assert not np.allclose(got, reranker.score(queries, images, captions), atol=1e-4)
    # same as scoring with the merged model directly
    merged = lora.merge_and_unload().eval()
    ref = Reference.__new__(Reference)
    ref.processor, ref.model = tuned.processor, merged
    np.testing.assert_allclose(got, ref.scores(_ragvl_prompts(queries, captions), images, "Yes", "No"),
                               atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# (5) rank
# ----------------------------------------------------------------------------------------------


def test_rank_orders_by_score_desc(reranker: VlmYesNoReranker, pairs: Any) -> None:
    _, images, captions = pairs
    scores = reranker.score(["red cat"] * len(images), images, captions)
    ranked = reranker.rank("red cat", images, captions)
    assert [r for _, _, r in ranked] == list(range(1, len(images) + 1))
    assert [i for i, _, _ in ranked] == sorted(range(len(images)), key=lambda i: (-scores[i], i))
    got = [s for _, s, _ in ranked]
    assert got == sorted(got, reverse=True)
    np.testing.assert_allclose(got, np.sort(scores)[::-1], atol=1e-6)


def test_a_bf16_checkpoint_runs_in_fp32_on_cpu(model_dir: Path, reranker: VlmYesNoReranker, pairs: Any,
                                               tmp_path: Path) -> None:
    """Most real VLM checkpoints are stored in bf16: on CPU (`precision: auto` = fp32) they must load as fp32,
    not in the checkpoint's own dtype (bf16 on CPU is many times slower)."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    bf16 = tmp_path / "bf16"
    Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoProcessor.from_pretrained(model_dir).save_pretrained(bf16)
    r = create(_spec(bf16), device="cpu", precision="fp32")
    assert r.model.dtype == torch.float32
    queries, images, captions = pairs
    got = r.score(queries, images, captions)
    # Exactly the fp32 model whose weights went through bf16 once (rounded by hand here): computed in fp32.
    rounded = create(_spec(model_dir), device="cpu", precision="fp32")
    rounded.model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in rounded.model.state_dict().items()})
    np.testing.assert_allclose(got, rounded.score(queries, images, captions), atol=1e-6, rtol=0)
    # And close to the unrounded model: the same order of the pairs, scores within bf16's rounding.
    full = reranker.score(queries, images, captions)
    assert list(np.argsort(-got, kind="stable")) == list(np.argsort(-full, kind="stable")), (got, full)
    np.testing.assert_allclose(got, full, atol=5e-3, rtol=0)


# ----------------------------------------------------------------------------------------------
# GPU: half precision through load_model's precision
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_half_precision(model_dir: Path, reranker: VlmYesNoReranker, pairs: Any, precision: str) -> None:
    queries, images, captions = pairs
    r = create(_spec(model_dir), device="cuda", precision=precision)
    assert r.model.dtype == (torch.float16 if precision == "fp16" else torch.bfloat16)
    got = r.score(queries, images, captions)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, reranker.score(queries, images, captions), atol=0.05)
