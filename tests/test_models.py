"""operators/models.py: resolution, fingerprints and loading; never a silent random init."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from operators.models import (
    ModelLoadError,
    ModelSpec,
    ResolvedModel,
    build_model,
    image_transform,
    resolve_model,
)

pytestmark = pytest.mark.timeout(300)

TINY_CFG = json.loads((Path(__file__).parents[1] / "operators" / "model_configs" / "mmr-tiny.json").read_text())


def _cfg(width: int = 64, layers: int = 2, embed_dim: int = 64) -> dict[str, Any]:
    """An mmr-tiny-like config with a different width / depth / output size."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": layers, "width": width, "head_width": width // 2,
                       "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": 2, "layers": layers},
    }


def _write_json(path: Path, obj: dict[str, Any]) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _inputs() -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(3, 3, 32, 32, generator=g), ["a red square", "a photo of a dog", ""]


@torch.no_grad()
def _outputs(model: Any, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    images, texts = _inputs()
    return model.encode_image(images), model.encode_text(tokenizer(texts))


def _save_safetensors(model: Any, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_random() -> ResolvedModel:
    return resolve_model(ModelSpec())


@pytest.fixture(scope="module")
def tiny_seed0(tiny_random: ResolvedModel) -> tuple[Any, Any]:
    return build_model(tiny_random)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory, tiny_seed0: tuple[Any, Any]) -> Path:
    return _save_safetensors(tiny_seed0[0], tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


# ------------------------------------------------------------------------------------------------
# resolve_model
# ------------------------------------------------------------------------------------------------


def test_default_spec_is_tiny_random(tiny_random: ResolvedModel) -> None:
    rm = tiny_random
    assert rm.spec == ModelSpec(name="mmr-tiny", pretrained=None, seed=0)
    assert rm.arch == "mmr-tiny"
    assert rm.embed_dim == 64
    assert rm.preprocess.size == 32
    assert rm.context_length == 77
    assert rm.weights == "random"
    assert rm.weights_id == "seed=0"
    assert rm.checkpoint_uri is None
    assert rm.config_json == TINY_CFG
    assert len(rm.fingerprint) == 64 and int(rm.fingerprint, 16) >= 0
    assert rm.fingerprint[:12] in rm.describe()


def test_preprocess_transform_matches_the_model_size(tiny_random: ResolvedModel) -> None:
    from PIL import Image

    x = image_transform(tiny_random.preprocess)(Image.new("RGB", (50, 40), (255, 0, 0)))
    assert tuple(x.shape) == (3, 32, 32)


def test_fingerprint_is_stable(tiny_random: ResolvedModel) -> None:
    again = resolve_model(ModelSpec(name="mmr-tiny", pretrained=None, seed=0))
    assert again.fingerprint == tiny_random.fingerprint
    assert again == tiny_random


def test_fingerprint_ignores_where_weights_are_cached(tiny_random: ResolvedModel, tmp_path: Path) -> None:
    assert resolve_model(ModelSpec(cache_dir=str(tmp_path))).fingerprint == tiny_random.fingerprint


def test_fingerprint_changes_with_seed_and_model(tiny_random: ResolvedModel) -> None:
    seed1 = resolve_model(ModelSpec(seed=1))
    vit = resolve_model(ModelSpec(name="ViT-B-32"))
    assert seed1.weights_id == "seed=1"
    assert vit.embed_dim == 512 and vit.preprocess.size == 224
    fps = {tiny_random.fingerprint, seed1.fingerprint, vit.fingerprint}
    assert len(fps) == 3


def test_unknown_model_name() -> None:
    with pytest.raises(ModelLoadError, match=r"model\.name") as ei:
        resolve_model(ModelSpec(name="no-such-model-xyz"))
    assert "no-such-model-xyz" in str(ei.value)


def test_unknown_pretrained_tag_for_builtin() -> None:
    with pytest.raises(ModelLoadError, match=r"model\.pretrained") as ei:
        resolve_model(ModelSpec(name="ViT-B-32", pretrained="not_a_real_tag"))
    assert "not_a_real_tag" in str(ei.value)


def test_tag_on_a_config_without_tags() -> None:
    with pytest.raises(ModelLoadError, match=r"model\.pretrained"):
        resolve_model(ModelSpec(name="mmr-tiny", pretrained="laion2b_s34b_b79k"))


def test_known_tag_resolves_without_downloading() -> None:
    rm = resolve_model(ModelSpec(name="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    assert rm.weights == "tag" and rm.weights_id == "laion2b_s34b_b79k"
    assert rm.config_json is None


@pytest.mark.parametrize("name", ["nope.safetensors", "sub/nope.pt"])
def test_missing_checkpoint(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with pytest.raises(ModelLoadError, match="checkpoint not found") as ei:
        resolve_model(ModelSpec(name="mmr-tiny", pretrained=str(path)))
    assert str(path) in str(ei.value)


def test_missing_json_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model\.name"):
        resolve_model(ModelSpec(name=str(tmp_path / "absent.json")))


# ------------------------------------------------------------------------------------------------
# build_model: random init
# ------------------------------------------------------------------------------------------------


def test_random_init_logs_a_warning(tiny_random: ResolvedModel, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="operators.models"):
        build_model(tiny_random)
    ours = [r for r in caplog.records if r.name == "operators.models" and r.levelno == logging.WARNING]
    assert ours, caplog.text
    assert any("random" in r.getMessage().lower() for r in ours)
    assert any("mmr-tiny" in r.getMessage() for r in ours)


def test_seeded_random_init_is_deterministic(tiny_random: ResolvedModel, tiny_seed0: tuple[Any, Any]) -> None:
    ref_img, ref_txt = _outputs(*tiny_seed0)
    torch.manual_seed(999)  # the global RNG state before the build must not matter
    img, txt = _outputs(*build_model(tiny_random))
    assert torch.equal(img, ref_img)
    assert torch.equal(txt, ref_txt)
    assert ref_img.shape == (3, 64) and ref_txt.shape == (3, 64)
    img1, txt1 = _outputs(*build_model(resolve_model(ModelSpec(seed=1))))
    assert not torch.allclose(img1, ref_img)
    assert not torch.allclose(txt1, ref_txt)


def test_built_model_is_in_eval_mode(tiny_seed0: tuple[Any, Any]) -> None:
    model, _ = tiny_seed0
    assert not model.training
    assert all(not m.training for m in model.modules())


# ------------------------------------------------------------------------------------------------
# build_model: checkpoints
# ------------------------------------------------------------------------------------------------


def test_safetensors_roundtrip(tiny_seed0: tuple[Any, Any], tiny_ckpt: Path, tiny_random: ResolvedModel,
                               caplog: pytest.LogCaptureFixture) -> None:
    import hashlib

    rm = resolve_model(ModelSpec(name="mmr-tiny", pretrained=str(tiny_ckpt)))
    assert rm.weights == "file"
    assert rm.checkpoint_uri == str(tiny_ckpt)
    assert rm.weights_id == hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()
    assert rm.fingerprint != tiny_random.fingerprint
    # A different global seed before the build proves the weights come from the file.
    torch.manual_seed(4321)
    with caplog.at_level(logging.WARNING, logger="operators.models"):
        model, tok = build_model(rm)
    assert not [r for r in caplog.records if r.name == "operators.models" and "RANDOM" in r.getMessage()]
    img, txt = _outputs(model, tok)
    ref_img, ref_txt = _outputs(*tiny_seed0)
    torch.testing.assert_close(img, ref_img)
    torch.testing.assert_close(txt, ref_txt)


def test_checkpoint_fingerprint_follows_content(tiny_ckpt: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(tiny_ckpt, copy)
    a = resolve_model(ModelSpec(pretrained=str(tiny_ckpt)))
    b = resolve_model(ModelSpec(pretrained=str(copy)))
    assert a.fingerprint == b.fingerprint  # same bytes, same model
    other = _save_safetensors(build_model(resolve_model(ModelSpec(seed=5)))[0], tmp_path / "seed5.safetensors")
    assert resolve_model(ModelSpec(pretrained=str(other))).fingerprint != a.fingerprint


def test_plain_torch_state_dict_checkpoint_loads(tiny_seed0: tuple[Any, Any], tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tiny_seed0[0].state_dict(), path)
    rm = resolve_model(ModelSpec(pretrained=str(path)))
    assert rm.weights == "file"
    img, _ = _outputs(*build_model(rm))
    torch.testing.assert_close(img, _outputs(*tiny_seed0)[0])


def test_other_architecture_checkpoint_is_refused(tmp_path: Path) -> None:
    cfg_path = _write_json(tmp_path / "narrow.json", _cfg(width=32))
    narrow = build_model(resolve_model(ModelSpec(name=str(cfg_path))))[0]
    ckpt = _save_safetensors(narrow, tmp_path / "narrow.safetensors")
    rm = resolve_model(ModelSpec(name="mmr-tiny", pretrained=str(ckpt)))
    assert rm.weights == "file"
    with pytest.raises(ModelLoadError) as ei:
        build_model(rm)
    assert "mmr-tiny" in str(ei.value)


def test_checkpoint_with_missing_keys_is_refused(tiny_seed0: tuple[Any, Any], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in tiny_seed0[0].state_dict().items() if not k.startswith("visual.proj")}
    assert len(sd) < len(tiny_seed0[0].state_dict())
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ModelLoadError, match="visual.proj"):
        build_model(resolve_model(ModelSpec(pretrained=str(path))))


def test_corrupt_checkpoint_is_refused(tiny_ckpt: Path, tmp_path: Path) -> None:
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(tiny_ckpt.read_bytes()[: 1000])
    with pytest.raises(ModelLoadError):
        build_model(resolve_model(ModelSpec(pretrained=str(path))))


class _Evil:
    """Unpickling this runs ``exec(code)``: the classic pickle code-execution payload."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (self.code,))


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": _Evil(f"open({str(marker)!r}, 'w').write('pwned')")}, path)
    return path


def test_evil_pickle_payload_really_runs_when_unpickled_unsafely(tmp_path: Path) -> None:
    # Control for the test below: the payload is live, so "marker absent" there means "refused".
    marker = tmp_path / "control-marker"
    path = _evil_checkpoint(tmp_path / "control.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


def test_pickle_checkpoint_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned-marker"
    path = _evil_checkpoint(tmp_path / "evil.pt", marker)
    rm = resolve_model(ModelSpec(name="mmr-tiny", pretrained=str(path)))
    with pytest.raises(ModelLoadError):
        build_model(rm)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# named weights that cannot be fetched: an error, never a random model
# ------------------------------------------------------------------------------------------------


def test_pretrained_tag_offline_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable at import time: set the live flag as well.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    # An empty cache, so weights cached on this machine cannot make the load succeed.
    spec = ModelSpec(name="ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path / "hf-cache"))
    rm = resolve_model(spec)
    assert rm.weights == "tag"
    with pytest.raises(ModelLoadError) as ei:
        build_model(rm)
    assert "laion2b_s34b_b79k" in str(ei.value)


# ------------------------------------------------------------------------------------------------
# JSON config files as model.name
# ------------------------------------------------------------------------------------------------


def test_json_config_file_resolves_and_builds(tmp_path: Path) -> None:
    import open_clip

    # A config unique to this test (embed_dim 48), so no earlier test registered it.
    cfg = _cfg(width=64, embed_dim=48)
    path = _write_json(tmp_path / "custom.json", cfg)
    rm = resolve_model(ModelSpec(name=str(path)))
    assert rm.arch.startswith("json-")
    assert rm.config_json == cfg
    assert rm.embed_dim == 48 and rm.preprocess.size == 32
    assert rm.arch not in open_clip.list_models()  # resolving registers nothing
    model, tok = build_model(rm)
    assert rm.arch in open_clip.list_models()  # building registered it in this process
    img, txt = _outputs(model, tok)
    assert img.shape == (3, 48) and txt.shape == (3, 48)
    # Same config at another path: same architecture, same fingerprint.
    other = _write_json(tmp_path / "again.json", cfg)
    assert resolve_model(ModelSpec(name=str(other))).fingerprint == rm.fingerprint
    # A different config: a different fingerprint.
    wider = _write_json(tmp_path / "wider.json", _cfg(width=64, embed_dim=40))
    assert resolve_model(ModelSpec(name=str(wider))).fingerprint != rm.fingerprint


def test_json_config_with_preprocess_section(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "wrapped.json", {
        "model_cfg": _cfg(),
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    })
    rm = resolve_model(ModelSpec(name=str(path)))
    assert rm.preprocess.mean == (0.5, 0.5, 0.5)
    assert rm.preprocess.std == (0.25, 0.25, 0.25)
    assert rm.fingerprint != resolve_model(ModelSpec(name=str(_write_json(tmp_path / "plain.json", _cfg())))).fingerprint


def test_json_config_same_as_tiny_loads_tiny_checkpoint(tiny_seed0: tuple[Any, Any], tiny_ckpt: Path,
                                                        tmp_path: Path) -> None:
    path = _write_json(tmp_path / "tiny-copy.json", TINY_CFG)
    model, tok = build_model(resolve_model(ModelSpec(name=str(path), pretrained=str(tiny_ckpt))))
    torch.testing.assert_close(_outputs(model, tok)[0], _outputs(*tiny_seed0)[0])
