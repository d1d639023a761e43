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


def load_model(model_cls: Any, spec: RerankerSpec, device: str, precision: str) -> Any:
    """``model_cls.from_pretrained`` with the project's rules; eval mode, on ``device``."""
    src = _source(spec)
    try:
        model = model_cls.from_pretrained(src, dtype=torch_dtype(precision) if device == "cuda" else None,
                                          use_safetensors=True, **common_kwargs(spec))
    except RerankerLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure is fatal: never fall back to random weights
        raise RerankerLoadError(f"rerank.model: cannot load {spec.model!r} as {model_cls.__name__}: "
                                f"{type(e).__name__}: {e}") from None
    if spec.lora_adapter:
        try:
            from peft import PeftModel
        except ImportError:
            raise RerankerLoadError("rerank.lora_adapter needs the 'peft' package (pip install peft)") from None
        try:
            model = PeftModel.from_pretrained(model, _source(spec, "lora_adapter")).merge_and_unload()
        except Exception as e:  # noqa: BLE001
            raise RerankerLoadError(f"rerank.lora_adapter: cannot apply {spec.lora_adapter!r}: {e}") from None
    return model.to(device).eval()


def load_processor(proc_cls: Any, spec: RerankerSpec) -> Any:
    try:
        return proc_cls.from_pretrained(_source(spec), **common_kwargs(spec))
    except Exception as e:  # noqa: BLE001
        raise RerankerLoadError(f"rerank.model: cannot load the processor/tokenizer of {spec.model!r}: "
                                f"{type(e).__name__}: {e}") from None
