"""``blip_itm`` and ``cross_encoder`` reranker backends on tiny random checkpoints (offline, CPU fp32).

Each backend is loaded the real way (``save_pretrained`` to a directory, safetensors, through
``operators.rerankers.hf``) and checked against transformers called directly on the same pairs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from operators.rerankers import blip_itm, cross_encoder  # noqa: F401 - registers the backends
from operators.rerankers.base import RerankerLoadError, RerankerSpec, create
from tests.tiny_hf import minilm_dir, save_tiny_bert, save_tiny_blip

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5
QUERIES = [
    "a cat",
    "two dogs running on the beach near the water",
    "red car",
    "a man and a woman playing with a ball in the park on a sunny afternoon while children watch "
    "from the street and a bus goes by",  # longer than max_length: truncated
    "sky",
]
CAPTIONS = [
    "a cat sitting on a red car",
    "dogs",
    "the sky is blue and the water is green " * 6,  # truncated together with the query
    "a photo of a tree",
    "a bus in the city street",
]


def _images(n: int = 5) -> list[Image.Image]:
    rs = np.random.RandomState(7)
    shapes = [(24 + 9 * i, 40 - 3 * i, 3) for i in range(n)]  # mixed sizes: the processor resizes
    return [Image.fromarray(rs.randint(0, 256, s, dtype=np.uint8)) for s in shapes]


@pytest.fixture(scope="module", autouse=True)
def _offline() -> Iterator[None]:
    """Nothing here may reach the HF hub: every model is a local directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-hf")
    return {
        "blip": save_tiny_blip(root / "blip", seed=1),
        "ce1": save_tiny_bert(root / "ce1", num_labels=1, seed=2),
        "ce2": save_tiny_bert(root / "ce2", num_labels=2, seed=3),
    }


@pytest.fixture(scope="module")
def blip(dirs: dict[str, Path]):
    return create(RerankerSpec(backend="blip_itm", model=str(dirs["blip"]), max_length=16))


@pytest.fixture(scope="module")
def ce1(dirs: dict[str, Path]):
    return create(RerankerSpec(backend="cross_encoder", model=str(dirs["ce1"]), max_length=24))


@pytest.fixture(scope="module")
def ce2(dirs: dict[str, Path]):
    return create(RerankerSpec(backend="cross_encoder", model=str(dirs["ce2"]), max_length=24))


def _ranked(scores: np.ndarray) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))


def test_checkpoints_are_safetensors_with_real_vocab(dirs: dict[str, Path]) -> None:
    for d in dirs.values():
        assert (d / "model.safetensors").is_file()
        assert not list(d.glob("*.bin"))
    if minilm_dir() is not None:  # the real bert-base-uncased WordPiece vocab
        tok = transformers.AutoTokenizer.from_pretrained(dirs["ce1"])
        assert len(tok) == 30522
        assert tok.convert_tokens_to_ids(["[CLS]", "[SEP]", "the"]) == [101, 102, 1996]
        assert tok.tokenize("Playing Ball") == ["playing", "ball"]


# ---------------------------------------------------------------------------------------------
# blip_itm
# ---------------------------------------------------------------------------------------------


def _blip_reference(d: Path, queries: list[str], images: list[Image.Image], max_length: int) -> np.ndarray:
    """P(match) from transformers directly, one pair at a time (no padding involved)."""
    model = transformers.BlipForImageTextRetrieval.from_pretrained(d).eval()
    proc = transformers.BlipProcessor.from_pretrained(d)
    out = []
    with torch.no_grad():
        for q, im in zip(queries, images, strict=True):
            enc = proc(images=im, text=q, truncation=True, max_length=max_length, return_tensors="pt")
            logits = model(**enc, use_itm_head=True).itm_score
            out.append(float(torch.softmax(logits, dim=-1)[0, 1]))
    return np.asarray(out, dtype=np.float32)


def test_blip_matches_transformers(blip, dirs: dict[str, Path]) -> None:
    images = _images()
    s = blip.score(QUERIES, images, [None] * len(images))
    assert s.dtype == np.float32 and s.shape == (len(images),)
    assert ((s >= 0) & (s <= 1)).all()
    np.testing.assert_allclose(s, _blip_reference(dirs["blip"], QUERIES, images, 16), atol=ATOL, rtol=0)


def test_blip_rank_follows_scores(blip, dirs: dict[str, Path]) -> None:
    images, query = _images(), "a red car on the street"
    ref = _blip_reference(dirs["blip"], [query] * len(images), images, 16)
    assert len(set(np.round(ref, 4))) == len(ref), "tiny model should separate the images"
    ranked = blip.rank(query, images, [None] * len(images))
    assert [i for i, _, _ in ranked] == _ranked(ref)
    assert [r for _, _, r in ranked] == list(range(1, len(images) + 1))
    np.testing.assert_allclose([sc for _, sc, _ in ranked], ref[_ranked(ref)], atol=ATOL, rtol=0)


def test_blip_batch_equals_one_by_one(blip) -> None:
    images = _images()
    batched = blip.score(QUERIES, images, [None] * len(images))
    single = np.concatenate([blip.score([q], [im], [None]) for q, im in zip(QUERIES, images, strict=True)])
    np.testing.assert_allclose(batched, single, atol=ATOL, rtol=0)
    rev = blip.score(QUERIES[::-1], images[::-1], [None] * len(images))
    np.testing.assert_allclose(rev[::-1], batched, atol=ATOL, rtol=0)


def test_blip_ignores_captions_and_converts_modes(blip) -> None:
    images = _images(3)
    base = blip.score(QUERIES[:3], images, [None] * 3)
    with_captions = blip.score(QUERIES[:3], images, ["some caption", None, "x"])
    np.testing.assert_allclose(with_captions, base, atol=ATOL, rtol=0)
    rgba = [im.convert("RGBA") for im in images]
    np.testing.assert_allclose(blip.score(QUERIES[:3], rgba, [None] * 3), base, atol=ATOL, rtol=0)


def test_blip_needs_an_image(blip) -> None:
    images = _images(2)
    with pytest.raises(ValueError, match="needs an image"):
        blip.score(["a cat", "a dog"], [images[0], None], [None, "a dog"])
    assert blip.needs_image and not blip.needs_caption
    assert blip.score([], [], []).shape == (0,)


def test_blip_load_errors(tmp_path: Path) -> None:
    with pytest.raises(RerankerLoadError, match="not found"):
        create(RerankerSpec(backend="blip_itm", model=str(tmp_path / "nope")))
    # A BLIP checkpoint without the ITM head: transformers would random-init it with a warning.
    wrong = save_tiny_blip(tmp_path / "blip-base", model_cls=transformers.BlipForConditionalGeneration)
    with pytest.raises(RerankerLoadError, match=r"itm_head\.(bias|weight)"):
        create(RerankerSpec(backend="blip_itm", model=str(wrong)))
    no_proc = save_tiny_blip(tmp_path / "blip-noproc", processor=False)
    with pytest.raises(RerankerLoadError, match="processor"):
        create(RerankerSpec(backend="blip_itm", model=str(no_proc)))
    # A processor config but no tokenizer files: transformers builds an empty tokenizer silently.
    transformers.BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(no_proc)
    with pytest.raises(RerankerLoadError, match="no tokenizer files"):
        create(RerankerSpec(backend="blip_itm", model=str(no_proc)))


# ---------------------------------------------------------------------------------------------
# cross_encoder
# ---------------------------------------------------------------------------------------------


def _ce_reference(d: Path, queries: list[str], captions: list[str], max_length: int) -> np.ndarray:
    model = transformers.AutoModelForSequenceClassification.from_pretrained(d).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d)
    out = []
    with torch.no_grad():
        for q, c in zip(queries, captions, strict=True):
            enc = tok(q, c, truncation="longest_first", max_length=max_length, return_tensors="pt")
            logits = model(**enc).logits[0]
            p = torch.sigmoid(logits[0]) if logits.numel() == 1 else torch.softmax(logits, -1)[1]
            out.append(float(p))
    return np.asarray(out, dtype=np.float32)


@pytest.mark.parametrize("which", ["ce1", "ce2"])
def test_cross_encoder_matches_transformers(which: str, request: pytest.FixtureRequest,
                                            dirs: dict[str, Path]) -> None:
    ce = request.getfixturevalue(which)
    s = ce.score(QUERIES, [None] * len(QUERIES), CAPTIONS)
    assert s.dtype == np.float32 and s.shape == (len(QUERIES),)
    assert ((s >= 0) & (s <= 1)).all()
    np.testing.assert_allclose(s, _ce_reference(dirs[which], QUERIES, CAPTIONS, 24), atol=ATOL, rtol=0)


def test_cross_encoder_rank_follows_scores(ce1, dirs: dict[str, Path]) -> None:
    query = "a cat on a red car"
    ref = _ce_reference(dirs["ce1"], [query] * len(CAPTIONS), CAPTIONS, 24)
    assert len(set(np.round(ref, 4))) == len(ref), "tiny model should separate the captions"
    ranked = ce1.rank(query, [None] * len(CAPTIONS), CAPTIONS)
    assert [i for i, _, _ in ranked] == _ranked(ref)
    np.testing.assert_allclose([sc for _, sc, _ in ranked], ref[_ranked(ref)], atol=ATOL, rtol=0)


def test_cross_encoder_batch_equals_one_by_one(ce1, ce2) -> None:
    for ce in (ce1, ce2):
        batched = ce.score(QUERIES, [None] * len(QUERIES), CAPTIONS)
        single = np.concatenate([ce.score([q], [None], [c]) for q, c in zip(QUERIES, CAPTIONS, strict=True)])
        np.testing.assert_allclose(batched, single, atol=ATOL, rtol=0)


def test_cross_encoder_raw_logit_option(ce1, dirs: dict[str, Path]) -> None:
    raw = create(RerankerSpec(backend="cross_encoder", model=str(dirs["ce1"]), max_length=24,
                              extra={"activation": "none"}))
    logits = raw.score(QUERIES, [None] * len(QUERIES), CAPTIONS)
    probs = ce1.score(QUERIES, [None] * len(QUERIES), CAPTIONS)
    np.testing.assert_allclose(1 / (1 + np.exp(-logits.astype(np.float64))), probs, atol=ATOL, rtol=0)


def test_cross_encoder_agrees_with_sentence_transformers(dirs: dict[str, Path], ce1, ce2) -> None:
    st = pytest.importorskip("sentence_transformers")
    for name, ce in (("ce1", ce1), ("ce2", ce2)):
        ref = st.CrossEncoder(str(dirs[name]), max_length=24, device="cpu").predict(
            list(zip(QUERIES, CAPTIONS, strict=True)), batch_size=2, convert_to_numpy=True)
        if ref.ndim == 2:  # two labels: sentence-transformers returns raw logits
            ref = torch.softmax(torch.from_numpy(ref), dim=-1)[:, 1].numpy()
        np.testing.assert_allclose(ce.score(QUERIES, [None] * len(QUERIES), CAPTIONS), ref, atol=ATOL, rtol=0)


def test_cross_encoder_needs_a_caption(ce1) -> None:
    with pytest.raises(ValueError, match="needs a caption"):
        ce1.score(["a cat", "a dog"], [None, None], ["a cat", None])
    assert ce1.needs_caption and not ce1.needs_image
    assert ce1.score([], [], []).shape == (0,)


def test_cross_encoder_load_errors(tmp_path: Path) -> None:
    with pytest.raises(RerankerLoadError, match="not found"):
        create(RerankerSpec(backend="cross_encoder", model=str(tmp_path / "nope")))
    # A plain encoder checkpoint (no classifier): transformers would random-init the head with a warning.
    bare = save_tiny_bert(tmp_path / "bert", model_cls=transformers.BertModel)
    with pytest.raises(RerankerLoadError, match=r"classifier\.(bias|weight)"):
        create(RerankerSpec(backend="cross_encoder", model=str(bare)))
    three = save_tiny_bert(tmp_path / "three", num_labels=3)
    with pytest.raises(RerankerLoadError, match="3 labels"):
        create(RerankerSpec(backend="cross_encoder", model=str(three)))
    # transformers builds an empty (all-[UNK]) tokenizer from a directory without tokenizer files.
    no_tok = save_tiny_bert(tmp_path / "notok", tokenizer=False)
    with pytest.raises(RerankerLoadError, match="no tokenizer files"):
        create(RerankerSpec(backend="cross_encoder", model=str(no_tok)))
    with pytest.raises(ValueError, match="activation"):
        create(RerankerSpec(backend="cross_encoder", model=str(no_tok), extra={"activation": "tanh"}))
