"""open_clip model specs: resolution, fingerprinting and loading (never a silent random init).

A :class:`ModelSpec` names an architecture (an open_clip built-in such as ``ViT-B-32``, a config
shipped in ``operators/model_configs`` such as ``mmr-tiny``, a JSON config file URI, or
``hf-hub:org/repo``) and its weights (``pretrained``: an open_clip tag, ``hf-hub:org/repo``, a
local/s3 checkpoint URI, or ``null`` for a seeded random init that is logged as a warning).

:func:`resolve_model` runs on the driver without building the model: it checks the spec, fixes
the preprocessing and computes the fingerprint. :func:`build_model` runs where the model is used
(actors) and registers configs there, because open_clip's config registry is per process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from operators.storage import Storage, StorageOptions, scheme_of

log = logging.getLogger(__name__)

SHIPPED_CONFIGS = Path(__file__).parent / "model_configs"
HF_PREFIX = "hf-hub:"


class ModelLoadError(RuntimeError):
    """A model or its weights could not be resolved or loaded."""


class ModelSpec(BaseModel):
    """Which open_clip model and which weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="mmr-tiny", min_length=1)
    # open_clip tag | "hf-hub:org/repo" | checkpoint URI (.safetensors preferred) | null (random init)
    pretrained: str | None = None
    hf_revision: str | None = None
    seed: int = 0  # only used with pretrained: null
    cache_dir: str | None = None  # where open_clip / HF hub look for downloaded weights


@dataclass(frozen=True)
class Preprocess:
    """The image preprocessing a model expects (open_clip PreprocessCfg, as plain data)."""

    size: int | tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    resize_mode: str
    fill_color: int = 0


@dataclass(frozen=True)
class ResolvedModel:
    """A checked spec: everything a worker needs to build exactly this model, plus its fingerprint."""

    spec: ModelSpec
    arch: str  # open_clip model name to instantiate
    config_json: dict[str, Any] | None  # registered in the worker when not a built-in
    weights: Literal["random", "tag", "hf-hub", "file"]
    weights_id: str  # tag, hub id@revision, file sha256, or random seed
    checkpoint_uri: str | None
    preprocess: Preprocess
    embed_dim: int
    context_length: int
    fingerprint: str

    def describe(self) -> str:
        return f"{self.arch} [{self.weights}:{self.weights_id[:16]}] fp={self.fingerprint[:12]}"


def _register_shipped() -> None:
    import open_clip

    if SHIPPED_CONFIGS.is_dir() and "mmr-tiny" not in open_clip.list_models():
        open_clip.add_model_config(SHIPPED_CONFIGS)


def _register_json(arch: str, cfg: dict[str, Any]) -> None:
    """Register a model config under ``arch`` in this process (open_clip's registry is global)."""
    import open_clip

    if arch in open_clip.list_models():
        return
    d = Path(tempfile.mkdtemp(prefix="mmr-oc-cfg-"))
    (d / f"{arch}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / f"{arch}.json")


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def resolve_model(spec: ModelSpec, storage_options: StorageOptions | None = None) -> ResolvedModel:
    """Check ``spec`` on the driver (no weights are loaded) and fix preprocessing + fingerprint."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    _register_shipped()
    storage = Storage(storage_options)
    name = spec.name
    config_json: dict[str, Any] | None = None
    pp: dict[str, Any] = asdict(PreprocessCfg())
    checkpoint = None

    if name.startswith(HF_PREFIX) or (spec.pretrained or "").startswith(HF_PREFIX):
        hub_id = (name if name.startswith(HF_PREFIX) else spec.pretrained)[len(HF_PREFIX):]
        try:
            from open_clip.pretrained import download_pretrained_from_hf

            path = download_pretrained_from_hf(
                hub_id, filename="open_clip_config.json", revision=spec.hf_revision, cache_dir=spec.cache_dir
            )
            hub_cfg = json.loads(Path(path).read_text())
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"model.pretrained: cannot fetch open_clip config for hf-hub:{hub_id}: {e}") from None
        model_cfg = hub_cfg["model_cfg"]
        pp = merge_preprocess_dict(pp, hub_cfg.get("preprocess_cfg", {}))
        arch = "hf-" + hub_id.replace("/", "--")
        config_json = model_cfg
        weights, weights_id = "hf-hub", f"{hub_id}@{spec.hf_revision or 'main'}"
    else:
        if name.endswith(".json"):
            try:
                raw = json.loads(storage.read_bytes(name))
            except Exception as e:  # noqa: BLE001
                raise ModelLoadError(f"model.name: cannot read model config {name}: {e}") from None
            model_cfg = raw.get("model_cfg", raw)
            pp = merge_preprocess_dict(pp, raw.get("preprocess_cfg", {}))
            arch = "json-" + _sha(model_cfg)[:12]
            config_json = model_cfg
        else:
            model_cfg = open_clip.get_model_config(name)
            if model_cfg is None:
                raise ModelLoadError(
                    f"model.name: unknown open_clip model {name!r} (a built-in, a shipped config "
                    f"{sorted(p.stem for p in SHIPPED_CONFIGS.glob('*.json'))}, or a .json config URI)"
                )
            arch = name
            if (SHIPPED_CONFIGS / f"{name}.json").is_file():
                config_json = model_cfg
        pretrained = spec.pretrained
        if pretrained is None:
            weights, weights_id = "random", f"seed={spec.seed}"
        elif scheme_of(pretrained) != "file" or os.path.sep in pretrained or "." in Path(pretrained).name:
            if not storage.exists(pretrained):
                raise ModelLoadError(f"model.pretrained: checkpoint not found: {pretrained}")
            checkpoint = pretrained
            weights, weights_id = "file", storage.sha256(pretrained)
        else:
            tags = open_clip.list_pretrained_tags_by_model(arch) if config_json is None else []
            if pretrained not in tags:
                raise ModelLoadError(
                    f"model.pretrained: {pretrained!r} is neither a known open_clip tag for {arch} "
                    f"(known: {tags}) nor an existing checkpoint path"
                )
            pp = merge_preprocess_dict(pp, open_clip.get_pretrained_cfg(arch, pretrained))
            weights, weights_id = "tag", pretrained

    size = model_cfg["vision_cfg"].get("image_size", 224)
    pp["size"] = tuple(size) if isinstance(size, list) else size
    preprocess = Preprocess(
        size=pp["size"],
        mean=tuple(pp["mean"]),
        std=tuple(pp["std"]),
        interpolation=pp["interpolation"],
        resize_mode=pp["resize_mode"],
        fill_color=pp.get("fill_color", 0),
    )
    fingerprint = _sha(
        {"arch_cfg": model_cfg, "name": arch, "weights": weights, "weights_id": weights_id,
         "preprocess": asdict(preprocess)}
    )
    return ResolvedModel(
        spec=spec,
        arch=arch,
        config_json=config_json,
        weights=weights,  # type: ignore[arg-type]
        weights_id=weights_id,
        checkpoint_uri=checkpoint,
        preprocess=preprocess,
        embed_dim=int(model_cfg["embed_dim"]),
        context_length=int(model_cfg.get("text_cfg", {}).get("context_length", 77)),
        fingerprint=fingerprint,
    )


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when this process sees a GPU, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> fp32 on CPU; bf16 on GPUs that support it, fp16 otherwise."""
    if precision != "auto":
        return precision
    if device != "cuda":
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def image_transform(pp: Preprocess) -> Any:
    """open_clip's own eval transform for this preprocessing (PIL image -> float tensor)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = PreprocessCfg(size=pp.size, mean=pp.mean, std=pp.std, interpolation=pp.interpolation,
                        resize_mode=pp.resize_mode, fill_color=pp.fill_color)
    return image_transform_v2(cfg, is_train=False)


def _local_checkpoint(uri: str, storage_options: StorageOptions | None) -> str:
    if scheme_of(uri) == "file":
        return uri
    return _download_cached(uri, storage_options)


@lru_cache(maxsize=8)
def _download_cached(uri: str, storage_options: StorageOptions | None) -> str:
    suffix = "".join(Path(uri).suffixes[-1:]) or ".bin"
    fd, path = tempfile.mkstemp(prefix="mmr-ckpt-", suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(Storage(storage_options).read_bytes(uri))
    return path


def refused_pickle(exc: BaseException) -> str | None:
    """One line naming what ``torch.load(weights_only=True)`` refused, or None for any other failure.

    torch's own message is several lines long and explains how to turn the protection off: never shown.
    """
    import pickle

    if not isinstance(exc, pickle.UnpicklingError) or "weights only load failed" not in str(exc).lower():
        return None
    for line in str(exc).splitlines():
        if "WeightsUnpickler error:" in line:
            detail = line.split("WeightsUnpickler error:", 1)[1].strip()
            return "weights-only load: " + detail.split(". ", 1)[0].rstrip(".")
    return "weights-only load: the file holds objects other than tensors"


def build_model(rm: ResolvedModel, device: str = "cpu", precision: str = "fp32",
                storage_options: StorageOptions | None = None) -> tuple[Any, Any]:
    """Instantiate the resolved model in this process; returns ``(model, tokenizer)`` in eval mode.

    Raises :class:`ModelLoadError` when named weights cannot be loaded; random init happens only for
    ``weights == "random"`` and is logged as a warning.
    """
    import open_clip
    import torch

    _register_shipped()
    if rm.config_json is not None:
        _register_json(rm.arch, rm.config_json)
    force_pp = asdict(rm.preprocess)
    common = dict(precision=precision, device=device, force_preprocess_cfg=force_pp)
    try:
        if rm.weights == "random":
            log.warning("RANDOM WEIGHTS: %s initialised from seed %d (pretrained: null); "
                        "rankings are meaningless", rm.arch, rm.spec.seed)
            torch.manual_seed(rm.spec.seed)
            model = open_clip.create_model(rm.arch, pretrained=None, **common)
        elif rm.weights == "tag":
            model = open_clip.create_model(rm.arch, pretrained=rm.spec.pretrained,
                                           cache_dir=rm.spec.cache_dir, **common)
        elif rm.weights == "hf-hub":
            from open_clip.pretrained import download_pretrained_from_hf

            hub_id = rm.weights_id.rsplit("@", 1)[0]
            # open_clip would carry on with random weights if this download failed: do it first.
            ckpt = download_pretrained_from_hf(hub_id, revision=rm.spec.hf_revision, cache_dir=rm.spec.cache_dir)
            model = open_clip.create_model(rm.arch, pretrained=None, load_weights=False, **common)
            open_clip.load_checkpoint(model, ckpt, strict=True, weights_only=True)
        else:
            assert rm.checkpoint_uri is not None
            path = _local_checkpoint(rm.checkpoint_uri, storage_options)
            if Storage().sha256(path) != rm.weights_id:
                raise ModelLoadError(f"checkpoint {rm.checkpoint_uri} changed since it was resolved "
                                     "(sha256 differs from the fingerprint): refusing to mix weights")
            model = open_clip.create_model(rm.arch, pretrained=None, **common)
            # weights_only=True: a checkpoint that would run pickled code on load is refused.
            open_clip.load_checkpoint(model, path, strict=True, weights_only=True)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - any load failure is fatal, never a silent fallback
        refused = refused_pickle(e)
        if refused is not None:
            raise ModelLoadError(
                f"refused checkpoint {rm.checkpoint_uri or rm.spec.pretrained!r} for {rm.arch}: it holds pickled "
                f"objects that would run code when loaded ({refused}); save the weights as .safetensors"
            ) from None
        raise ModelLoadError(
            f"cannot load weights {rm.weights}:{rm.spec.pretrained!r} for {rm.arch}: {type(e).__name__}: {e}"
        ) from None
    model.eval()
    tokenizer = open_clip.get_tokenizer(rm.arch)
    return model, tokenizer
