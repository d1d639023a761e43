"""Loading transformers models for the HF reranker backends, the same way for all of them.

``spec.model`` is a local directory, an ``s3://`` directory (copied to a local temp dir once per
process), or a hub id (resolved through the HF cache; offline and missing is an error, never a random
model). Weights load as safetensors; ``trust_remote_code`` only with a pinned ``revision``; an optional
LoRA adapter is applied with peft.
"""

from __future__ import annotations

import logging
import os
import tempfile
from functools import lru_cache
from typing import Any

from operators.rerankers.base import RerankerLoadError, RerankerSpec, torch_dtype
from operators.storage import Storage, scheme_of

log = logging.getLogger(__name__)


@lru_cache(maxsize=4)
def local_dir(uri: str) -> str:
    """A local directory holding ``uri``'s files (s3 directories are copied once per process)."""
    if scheme_of(uri) == "file":
        return uri
    storage = Storage()
    dest = tempfile.mkdtemp(prefix="mmr-hf-")
    fs = storage.fs(uri)
    try:
        fs.get(uri.split("://", 1)[1].rstrip("/") + "/", dest + "/", recursive=True)
    except Exception as e:  # noqa: BLE001
        raise RerankerLoadError(f"rerank.model: cannot copy {uri}: {type(e).__name__}: {e}") from None
    return dest


def _source(spec: RerankerSpec, field: str = "model") -> str:
    value = getattr(spec, field)
    if value is None:
        raise RerankerLoadError(f"rerank.{field}: not set")
    if scheme_of(value) != "file":
        return local_dir(value)
    if os.path.sep in value or value.startswith("."):
        if not os.path.isdir(value):
            raise RerankerLoadError(f"rerank.{field}: directory not found: {value}")
        return value
    return value  # a hub id


def common_kwargs(spec: RerankerSpec) -> dict[str, Any]:
    if spec.trust_remote_code and not spec.revision:
        raise RerankerLoadError("rerank.trust_remote_code needs a pinned rerank.revision")
    kw: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kw["revision"] = spec.revision
    return kw


_PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _pickles_only(src: str) -> list[str]:
    """The pickle weight files of a local directory that has no safetensors file ([] otherwise)."""
    if not os.path.isdir(src):
        return []  # a hub id: from_pretrained(use_safetensors=True) enforces the same on download
    files = os.listdir(src)
    if any(f.endswith(".safetensors") for f in files):
        return []
    return sorted(f for f in files if f.endswith(_PICKLE_WEIGHTS))


def load_model(model_cls: Any, spec: RerankerSpec, device: str, precision: str) -> Any:
    """``model_cls.from_pretrained`` with the project's rules; eval mode, on ``device``."""
    src = _source(spec)
    pickles = _pickles_only(src)
    if pickles:  # refused anyway (use_safetensors=True); say why instead of "no file named model.safetensors"
        raise RerankerLoadError(f"rerank.model: {spec.model!r} holds only pickle weights ({', '.join(pickles)}), "
                                "refused because unpickling can run code: save them as safetensors")
    try:
        # Always explicit: dtype=None keeps a checkpoint's own dtype, so a bf16 checkpoint (most VLMs) would run
        # in bf16 on CPU, very slowly, against `precision: auto` = fp32 there.
        model, info = model_cls.from_pretrained(src, dtype=torch_dtype(precision),
                                                use_safetensors=True, output_loading_info=True,
                                                **common_kwargs(spec))
    except RerankerLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure is fatal: never fall back to random weights
        raise RerankerLoadError(f"rerank.model: cannot load {spec.model!r} as {model_cls.__name__}: "
                                f"{type(e).__name__}: {e}") from None
    # transformers random-initialises weights a checkpoint lacks and only warns: refuse that here.
    check_loading_info(info, model_cls.__name__, spec.model)
    if spec.lora_adapter:
        try:
            from peft import PeftModel
        except ImportError:
            raise RerankerLoadError("rerank.lora_adapter needs the 'peft' package (pip install peft)") from None
        adapter = _source(spec, "lora_adapter")
        # Without safetensors peft falls back to torch.load(adapter_model.bin): safetensors only, as for models.
        pickles = _pickles_only(adapter)
        if pickles:
            raise RerankerLoadError(f"rerank.lora_adapter: {spec.lora_adapter!r} holds only pickle weights "
                                    f"({', '.join(pickles)}), refused because unpickling can run code: "
                                    "save the adapter as safetensors")
        try:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        except Exception as e:  # noqa: BLE001
            raise RerankerLoadError(f"rerank.lora_adapter: cannot apply {spec.lora_adapter!r}: {e}") from None
    return model.to(device).eval()


def load_processor(proc_cls: Any, spec: RerankerSpec) -> Any:
    try:
        proc = proc_cls.from_pretrained(_source(spec), **common_kwargs(spec))
    except Exception as e:  # noqa: BLE001
        raise RerankerLoadError(f"rerank.model: cannot load the processor/tokenizer of {spec.model!r}: "
                                f"{type(e).__name__}: {e}") from None
    check_tokenizer(getattr(proc, "tokenizer", proc), None, spec.model)
    return proc


def _some(keys: Any, n: int = 8) -> str:
    keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def check_loading_info(info: dict[str, Any], cls_name: str, label: str | None) -> None:
    """Raise :class:`RerankerLoadError` if ``from_pretrained`` left weights missing or mismatched."""
    missing = info.get("missing_keys") or ()
    mismatched = info.get("mismatched_keys") or ()
    errors = info.get("error_msgs") or ()
    if missing:
        raise RerankerLoadError(
            f"rerank.model: {label!r} is not a {cls_name} checkpoint: {len(missing)} weights are missing "
            f"and would be randomly initialised: {_some(missing)}")
    if mismatched:
        raise RerankerLoadError(f"rerank.model: {label!r}: weights with the wrong shape for {cls_name}: "
                                f"{_some(mismatched)}")
    if errors:
        raise RerankerLoadError(f"rerank.model: {label!r}: errors loading {cls_name}: "
                                f"{'; '.join(map(str, errors))}")
    unexpected = info.get("unexpected_keys") or ()
    if unexpected:
        log.warning("rerank.model %r: %d checkpoint weights unused by %s: %s", label, len(unexpected),
                    cls_name, _some(unexpected))


def check_tokenizer(tokenizer: Any, config: Any, label: str | None) -> None:
    """Refuse a tokenizer with no vocabulary or one the model cannot embed.

    transformers builds an *empty* tokenizer (special tokens only, every word ``[UNK]``) from a
    directory that has a model but no tokenizer files, without an error.
    """
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - a tokenizer without get_vocab: nothing to check
        return
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    if not set(vocab) - special:
        raise RerankerLoadError(f"rerank.model: {label!r} has no tokenizer files (the loaded tokenizer has "
                                "special tokens only)")
    n_embed = getattr(config, "vocab_size", None)
    if isinstance(n_embed, int) and len(tokenizer) > n_embed:
        raise RerankerLoadError(f"rerank.model: {label!r}: the tokenizer has {len(tokenizer)} tokens but the "
                                f"model embeds only {n_embed}")


def text_max_length(spec_max: int, tokenizer: Any, config: Any) -> int:
    """``rerank.max_length`` capped by what the tokenizer and the position embeddings allow."""
    n = int(spec_max)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        n = min(n, tok_max)
    pos_max = getattr(config, "max_position_embeddings", None)
    if isinstance(pos_max, int) and pos_max > 0:
        n = min(n, pos_max)
    return n
