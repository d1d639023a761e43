"""The shipped pretrained bases: strict loading against their cards, and the pretraining stream they saw."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from operators.bases import (
    BASES_DIR,
    CARD_FILE,
    RERANKER,
    RETRIEVER,
    RETRIEVER_WEIGHTS,
    BaseCheckError,
    checked_base,
    reranker_dir,
    retriever_weights,
)
from pipelines.sample import PRETRAIN_SEEDS_FROM, make_sample, pretrain_group


@pytest.mark.parametrize("name", [RETRIEVER, RERANKER])
def test_shipped_bases_match_their_cards(name: str) -> None:
    d = checked_base(name)
    card = json.loads((d / CARD_FILE).read_text())
    assert card["files"], "a card lists the files it vouches for"
    assert card["data"]["seed"] >= PRETRAIN_SEEDS_FROM
    assert (d / "README.md").read_text().startswith(f"# {name}")


def test_a_changed_or_missing_file_is_an_error_never_a_model(tmp_path: Path) -> None:
    root = tmp_path / "bases"
    shutil.copytree(BASES_DIR / RETRIEVER, root / RETRIEVER)
    shutil.copytree(BASES_DIR / RERANKER, root / RERANKER)
    assert retriever_weights(root).endswith(RETRIEVER_WEIGHTS)
    assert Path(reranker_dir(root), "config.json").is_file()

    weights = root / RETRIEVER / RETRIEVER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(BaseCheckError, match=f"{RETRIEVER_WEIGHTS} has sha256"):
        retriever_weights(root)

    (root / RERANKER / "config.json").unlink()
    with pytest.raises(BaseCheckError, match="config.json is missing"):
        reranker_dir(root)
    with pytest.raises(BaseCheckError, match="card.json is missing"):
        checked_base("no-such-base", root)


def test_samples_never_use_the_pretraining_seeds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved for the pretraining stream"):
        make_sample(str(tmp_path / "s"), docs=8, queries=2, shards=1, seed=PRETRAIN_SEEDS_FROM)
    with pytest.raises(ValueError, match="pretraining seeds start at"):
        pretrain_group(0, 0)


def test_pretraining_groups_are_labelled_by_binding_and_the_shape_count_says_nothing() -> None:
    counts: dict[bool, set[int]] = {True: set(), False: set()}
    for g in range(40):
        grp = pretrain_group(PRETRAIN_SEEDS_FROM, g)
        assert len(grp.query_pairs) == (2 if g % 2 == 0 else 1)
        for (_image, caption, relevant), pairs in zip(grp.docs, grp.doc_pairs, strict=True):
            assert relevant == set(grp.query_pairs).issubset(pairs)
            for color, shape in pairs:
                assert f"{color} {shape}" in caption
            if g % 2 == 0:
                counts[relevant].add(len(pairs))
        for color, shape in grp.query_pairs:
            assert f"{color} {shape}" in grp.query
        # every group holds a doc with all the query's words bound the other way round (the hard negative)
        words = {w for p in grp.query_pairs for w in p}
        assert any(not rel and words <= {w for p in pairs for w in p}
                   for (_i, _c, rel), pairs in zip(grp.docs, grp.doc_pairs, strict=True))
    assert counts[True] == counts[False] == {2, 3}
    a, b = pretrain_group(PRETRAIN_SEEDS_FROM, 7), pretrain_group(PRETRAIN_SEEDS_FROM, 7)
    assert a.query == b.query and [d[0].tobytes() for d in a.docs] == [d[0].tobytes() for d in b.docs]
