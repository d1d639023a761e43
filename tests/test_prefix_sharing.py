"""``rerank.prefix_sharing``: each doc image through the vision encoder once, each shared prompt prefix once.

Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints saved to disk and loaded through the real loader
(no Ray). The per-pair path (``prefix_sharing: off``) is the reference, itself checked against an unbatched
reference in tests/test_reranker_vlm.py; here one more independent per-pair forward backs it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from operators.rerankers.base import RerankerSpec, create
from operators.rerankers.vlm_yesno import VlmYesNoReranker
from tests.tiny_vlm import QWEN2_VL_CHAT_TEMPLATE, build_tokenizer, save_tiny_vlm

ATOL = 1e-4
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _text_config(tok: Any, **kw: Any) -> dict[str, Any]:
    v = tok.get_vocab()
    return dict(vocab_size=len(v), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
                bos_token_id=v["<|endoftext|>"], eos_token_id=v["<|im_end|>"], pad_token_id=v["<|endoftext|>"], **kw)


def _special_ids(tok: Any) -> dict[str, int]:
    v = tok.get_vocab()
    return dict(image_token_id=v["<|image_pad|>"], video_token_id=v["<|video_pad|>"],
                vision_start_token_id=v["<|vision_start|>"], vision_end_token_id=v["<|vision_end|>"])


def save_tiny_family(family: str, path: Path, seed: int = 0) -> Path:
    """A tiny random checkpoint + processor of ``family`` (Qwen2-VL through tests/tiny_vlm.py)."""
    if family == "qwen2_vl":
        return save_tiny_vlm(path, seed=seed)
    from transformers import Qwen2VLImageProcessor

    tok = build_tokenizer()
    if family == "qwen2_5_vl":
        from transformers import (
            Qwen2_5_VLConfig,
            Qwen2_5_VLForConditionalGeneration,
            Qwen2_5_VLProcessor,
            Qwen2VLVideoProcessor,
        )

        cfg = Qwen2_5_VLConfig(
            text_config=_text_config(tok, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "mrope_section": [1, 1, 2]}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                               fullatt_block_indexes=[1]),
            **_special_ids(tok))
        model_cls: Any = Qwen2_5_VLForConditionalGeneration
        processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56),
                                        tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                                        chat_template=QWEN2_VL_CHAT_TEMPLATE)
    elif family == "qwen3_vl":
        from transformers import (
            Qwen3VLConfig,
            Qwen3VLForConditionalGeneration,
            Qwen3VLProcessor,
            Qwen3VLVideoProcessor,
        )

        cfg = Qwen3VLConfig(
            text_config=_text_config(tok, head_dim=8, rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2], "mrope_interleaved": True}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                               patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                               num_position_embeddings=16, deepstack_visual_indexes=[0]),
            **_special_ids(tok))
        model_cls = Qwen3VLForConditionalGeneration
        processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(patch_size=16, merge_size=2,
                                                                           min_pixels=32 * 32, max_pixels=64 * 64),
                                     tokenizer=tok, video_processor=Qwen3VLVideoProcessor(),
                                     chat_template=QWEN2_VL_CHAT_TEMPLATE)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model_cls(cfg).eval().save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-vlms")
    return {f: save_tiny_family(f, root / f) for f in FAMILIES}


def _spec(model_dir: Path, **kw: Any) -> RerankerSpec:
    return RerankerSpec(backend="vlm_yesno", model=str(model_dir), **kw)


def _image(seed: int, h: int, w: int, mode: str = "RGB") -> Image.Image:
    arr = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


def _call() -> tuple[list[str], list[Image.Image], list[str | None]]:
    """One score() call as the rerank stage makes it: each doc's one image object shared by its pairs.

    Doc A: one query. Doc B: five queries of different lengths, two starting with the same words (the
    common prefix runs into the query), no caption. Doc C: a grey-scale image with a caption, three queries,
    its pairs interleaved with doc B's. Doc D: the SAME image object as doc C under another caption.
    """
    a, b, c = _image(0, 28, 28), _image(1, 56, 56), _image(2, 40, 64, "L")
    rows: list[tuple[str, Image.Image, str | None]] = [
        ("red cat", a, "a red cat"),
        ("a small blue car with a big dog", b, None),
        ("tree", b, None),
        ("green", c, "a big green tree with a small dog and a blue car"),
        ("a small blue car", b, None),
        ("photo of the cat with a dog", c, "a big green tree with a small dog and a blue car"),
        ("dog", b, None),
        ("red dog", c, "a big green tree with a small dog and a blue car"),
        ("the cat is big", b, None),
        ("blue tree", c, "dog"),
    ]
    return [q for q, _, _ in rows], [im for _, im, _ in rows], [cap for _, _, cap in rows]


def _independent(r: VlmYesNoReranker, queries: list[str], images: list[Image.Image],
                 captions: list[str | None]) -> np.ndarray:
    """One processor call and one plain forward per pair (no padding, no cache)."""
    out = []
    for q, im, cap in zip(queries, images, captions, strict=True):
        enc = r.processor(text=[r.build_text(r.build_prompt(q, cap))], images=[im.convert("RGB")], return_tensors="pt",
                          **r.processor_kwargs)
        with torch.inference_mode():
            logits = r.model(**enc).logits[0, -1]
        out.append(torch.softmax(logits[[r.pos_id, r.neg_id]].float(), dim=-1)[0].item())
    return np.asarray(out, dtype=np.float32)


class Counter:
    """Counts the vision-encoder images and the model forward calls of a reranker."""

    def __init__(self, r: VlmYesNoReranker, monkeypatch: pytest.MonkeyPatch) -> None:
        self.images = 0
        self.forwards: list[tuple[int, int]] = []  # (batch, sequence length) of each forward
        model = r.model
        features, forward = model.get_image_features, model.forward

        def get_image_features(pixel_values: Any, image_grid_thw: Any = None, **kw: Any) -> Any:
            self.images += len(image_grid_thw)
            return features(pixel_values, image_grid_thw, **kw)

        def counted_forward(*args: Any, **kw: Any) -> Any:
            ids = kw.get("input_ids")
            self.forwards.append(tuple(ids.shape) if ids is not None else (-1, -1))
            return forward(*args, **kw)

        monkeypatch.setattr(model, "get_image_features", get_image_features)
        monkeypatch.setattr(model, "forward", counted_forward)


# ----------------------------------------------------------------------------------------------
# equal scores, each image and prefix once
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_scores_equal_the_per_pair_path(dirs: dict[str, Path], family: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    shared = create(_spec(dirs[family]))  # auto
    per_pair = create(_spec(dirs[family], prefix_sharing="off"))
    assert isinstance(shared, VlmYesNoReranker) and isinstance(per_pair, VlmYesNoReranker)
    assert shared.prefix_sharing and not per_pair.prefix_sharing
    queries, images, captions = _call()
    want = per_pair.score(queries, images, captions)
    assert want.std() > 0.01, f"scores too close together for the check to mean anything: {want}"
    np.testing.assert_allclose(want, _independent(per_pair, queries, images, captions), atol=ATOL, rtol=0)

    counter = Counter(shared, monkeypatch)
    got = shared.score(queries, images, captions)
    assert got.dtype == np.float32 and got.shape == (len(queries),)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    # 3 distinct images through the vision encoder once each; one prefix forward (4 groups: A, B, C, D) and one
    # suffix forward (all 10 pairs), the suffix only the query-dependent tail of each prompt.
    assert counter.images == 3
    assert [b for b, _ in counter.forwards] == [4, len(queries)], counter.forwards
    (_, prefix_len), (_, suffix_len) = counter.forwards
    assert suffix_len < prefix_len

    # each pair alone, each doc alone, and a sub-batch: the same scores
    for i in (0, 1, 9):
        np.testing.assert_allclose(shared.score(queries[i:i + 1], images[i:i + 1], captions[i:i + 1]), want[i:i + 1],
                                   atol=ATOL, rtol=0)
    b = [i for i in range(len(queries)) if images[i] is images[1]]
    np.testing.assert_allclose(shared.score([queries[i] for i in b], [images[i] for i in b], [captions[i] for i in b]),
                               want[b], atol=ATOL, rtol=0)
    np.testing.assert_allclose(shared.score(queries[2:7], images[2:7], captions[2:7]), want[2:7], atol=ATOL, rtol=0)


def test_many_queries_one_doc_cache_is_expanded_not_recomputed(dirs: dict[str, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    shared = create(_spec(dirs["qwen2_vl"]))
    per_pair = create(_spec(dirs["qwen2_vl"], prefix_sharing="off"))
    im = _image(7, 56, 56)
    words = "red blue green cat dog car tree photo small big".split()
    queries = [" ".join(words[: 1 + i % len(words)]) + f" {words[i % 7]}" for i in range(16)]  # 2 to 11 words
    caps: list[str | None] = ["a small dog"] * len(queries)
    want = per_pair.score(queries, [im] * len(queries), caps)
    counter = Counter(shared, monkeypatch)
    np.testing.assert_allclose(shared.score(queries, [im] * len(queries), caps), want, atol=ATOL, rtol=0)
    assert counter.images == 1
    assert [b for b, _ in counter.forwards] == [1, len(queries)]


def test_nothing_to_share_takes_the_per_pair_path(dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """One query over many docs (rank(), the live service): each image once anyway, so one full forward."""
    shared = create(_spec(dirs["qwen2_vl"]))
    per_pair = create(_spec(dirs["qwen2_vl"], prefix_sharing="off"))
    _, images, captions = _call()
    docs = [0, 1, 3, 9]  # A, B, C, D: D is C's image under another caption, a second prefix of one image
    ims, caps = [images[i] for i in docs[:3]], [captions[i] for i in docs[:3]]
    counter = Counter(shared, monkeypatch)
    assert shared.rank("red cat", ims, caps) == per_pair.rank("red cat", ims, caps)
    assert [b for b, _ in counter.forwards] == [3]
    ims, caps = [images[i] for i in docs], [captions[i] for i in docs]
    np.testing.assert_allclose(shared.score(["red cat"] * 4, ims, caps), per_pair.score(["red cat"] * 4, ims, caps),
                               atol=ATOL, rtol=0)
    assert [b for b, _ in counter.forwards[1:]] == [4, 4] and counter.images == 3  # shared: C's image once


@pytest.mark.parametrize("variant", ["no_chat_template", "system_prompt", "no_caption", "true_false"])
def test_prompt_variants(dirs: dict[str, Path], tmp_path: Path, variant: str) -> None:
    model_dir, kw = dirs["qwen2_vl"], {}
    if variant == "no_chat_template":
        model_dir = tmp_path / "no-template"
        shutil.copytree(dirs["qwen2_vl"], model_dir)
        for name in ("chat_template.jinja", "chat_template.json"):
            (model_dir / name).unlink(missing_ok=True)
    elif variant == "system_prompt":
        kw = {"extra": {"system_prompt": "You are a helpful relevance judge. Answer Yes or No."}}
    elif variant == "no_caption":
        kw = {"use_caption": False}
    else:  # a MonoQwen-style prompt: the query at the very end, True/False
        kw = {"prompt": "Assert the relevance of the previous document to the following query, answer True or "
                        "False. The query is: {query}", "positive_token": "True", "negative_token": "False"}
    shared = create(_spec(model_dir, **kw))
    per_pair = create(_spec(model_dir, prefix_sharing="off", **kw))
    assert shared.prefix_sharing
    assert shared.has_chat_template == (variant != "no_chat_template")
    queries, images, captions = _call()
    np.testing.assert_allclose(shared.score(queries, images, captions), per_pair.score(queries, images, captions),
                               atol=ATOL, rtol=0)


def test_lora_adapter_is_merged_then_shared(dirs: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """load_model merges the adapter (peft merge_and_unload): a plain model, so prefix sharing applies."""
    peft = pytest.importorskip("peft")
    from transformers import Qwen2VLForConditionalGeneration

    base = Qwen2VLForConditionalGeneration.from_pretrained(dirs["qwen2_vl"], use_safetensors=True)
    torch.manual_seed(1)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    shared = create(_spec(dirs["qwen2_vl"], lora_adapter=str(tmp_path / "adapter")))
    per_pair = create(_spec(dirs["qwen2_vl"], lora_adapter=str(tmp_path / "adapter"), prefix_sharing="off"))
    assert shared.prefix_sharing
    queries, images, captions = _call()
    np.testing.assert_allclose(shared.score(queries, images, captions), per_pair.score(queries, images, captions),
                               atol=ATOL, rtol=0)
    # An adapter left unmerged (a peft-wrapped model, as vlm_yesno training validates with) is not shared: such a
    # model swapped in after construction is scored on the per-pair path, to the merged model's scores.
    shared.model = lora.eval()
    assert "unmerged LoRA" in (shared.prefix_sharing_unsupported() or "")
    calls: list[int] = []
    monkeypatch.setattr(shared, "_score_shared", lambda *a: calls.append(1))
    np.testing.assert_allclose(shared.score(queries, images, captions), per_pair.score(queries, images, captions),
                               atol=ATOL, rtol=0)
    assert not calls


# ----------------------------------------------------------------------------------------------
# fallbacks and errors
# ----------------------------------------------------------------------------------------------


def test_query_first_falls_back_with_one_log_line(dirs: dict[str, Path], caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    last = {"extra": {"image_position": "last"}}
    with caplog.at_level(logging.INFO, logger="operators.rerankers.vlm_yesno"):
        auto = create(_spec(dirs["qwen2_vl"], **last))
    why = [r.getMessage() for r in caplog.records if "prefix_sharing auto" in r.getMessage()]
    assert len(why) == 1 and "image_position: last" in why[0], why
    assert not auto.prefix_sharing
    per_pair = create(_spec(dirs["qwen2_vl"], prefix_sharing="off", **last))
    queries, images, captions = _call()
    counter = Counter(auto, monkeypatch)
    np.testing.assert_allclose(auto.score(queries, images, captions), per_pair.score(queries, images, captions),
                               atol=1e-6, rtol=0)
    assert [b for b, _ in counter.forwards] == [len(queries)]  # the per-pair path: one full forward
    # Forced on anyway, the shared path itself reuses nothing wrongly: a doc whose queries come before its image
    # (the common prefix ends in the query) goes to the per-pair path; only a one-query doc, whose prefix is its
    # whole prompt but the last token (image included), is still shared (docs A and D).
    auto.prefix_sharing = True
    np.testing.assert_allclose(auto.score(queries, images, captions), per_pair.score(queries, images, captions),
                               atol=ATOL, rtol=0)
    texts = [auto.build_text(auto.build_prompt(q, c)) for q, c in zip(queries, captions, strict=True)]
    plan, alone, _ = auto._shared_plan(auto._token_ids(texts), images, captions)
    assert [rows for rows, _, _, _ in plan] == [[0], [9]] and alone == list(range(1, 9))
    with pytest.raises(ValueError, match=r"rerank\.prefix_sharing: on, but the image comes after the query"):
        create(_spec(dirs["qwen2_vl"], prefix_sharing="on", **last))


def test_on_off_and_bad_values(dirs: dict[str, Path]) -> None:
    assert create(_spec(dirs["qwen3_vl"], prefix_sharing="on")).prefix_sharing
    with pytest.raises(ValueError, match=r"rerank\.prefix_sharing: 'auto', 'on' or 'off'"):
        create(_spec(dirs["qwen2_vl"], prefix_sharing="yes"))


def test_other_architectures_are_not_shared(dirs: dict[str, Path]) -> None:
    r = create(_spec(dirs["qwen2_vl"]))
    r.model.config.model_type = "llava"  # what a LLaVA / Idefics3 / ... checkpoint reports
    try:
        why = r.prefix_sharing_unsupported() or ""
    finally:
        r.model.config.model_type = "qwen2_vl"
    assert "model_type 'llava'" in why and "qwen2_vl" in why


def test_missing_image_still_rejected(dirs: dict[str, Path]) -> None:
    """score() refuses a pair without an image (base.py) before any path runs: the rerank stage drops rejected
    docs' pairs from the call, so a call never holds None images; same error with sharing on or off."""
    queries, images, captions = _call()
    for mode in ("auto", "off"):
        r = create(_spec(dirs["qwen2_vl"], prefix_sharing=mode))
        with pytest.raises(ValueError, match="pair 3 has none"):
            r.score(queries, [*images[:3], None, *images[4:]], captions)  # type: ignore[list-item]


def test_image_token_in_a_query_goes_to_the_per_pair_path(dirs: dict[str, Path]) -> None:
    """A pair whose text holds a second image slot cannot share (the processor itself rejects it): the rest
    of the call still shares, and that pair fails as it does on the per-pair path."""
    shared = create(_spec(dirs["qwen2_vl"]))
    per_pair = create(_spec(dirs["qwen2_vl"], prefix_sharing="off"))
    queries, images, captions = _call()
    bad = [*queries[:2], "cat <|image_pad|>", *queries[3:]]
    with pytest.raises(ValueError, match="image"):
        per_pair.score(bad, images, captions)
    with pytest.raises(ValueError, match="image"):
        shared.score(bad, images, captions)
    plan, alone, used = shared._shared_plan(shared._token_ids([shared.build_text(shared.build_prompt(q, c))
                                                               for q, c in zip(bad, captions, strict=True)]),
                                            images, captions)
    assert alone == [2] and sum(len(rows) for rows, _, _, _ in plan) == len(queries) - 1 and len(used) == 3


def test_config_field_reaches_the_spec() -> None:
    from pipelines.config import ConfigError, parse_config
    from pipelines.context import reranker_spec

    base = {"root": "/r", "queries": "/q"}
    vlm = {"backend": "vlm_yesno", "model": "/m"}
    cfg = parse_config({**base, "rerank": vlm})
    assert cfg.rerank.prefix_sharing == "auto" and reranker_spec(cfg.rerank, cfg).prefix_sharing == "auto"
    cfg = parse_config({**base, "rerank": {**vlm, "prefix_sharing": "off"}})
    assert reranker_spec(cfg.rerank, cfg).prefix_sharing == "off"
    with pytest.raises(ConfigError, match="rerank.prefix_sharing"):
        parse_config({**base, "rerank": {**vlm, "prefix_sharing": "yes"}})
    with pytest.raises(ConfigError, match="prefix_sharing: on is for the vlm_yesno backend"):
        parse_config({**base, "rerank": {"backend": "clip", "prefix_sharing": "on"}})
    with pytest.raises(ConfigError, match="prefix_sharing: on needs the image before the query"):
        parse_config({**base, "rerank": {**vlm, "prefix_sharing": "on", "options": {"image_position": "last"}}})
