"""The reranker interface and its registry (backends are chosen by explicit name, never by model name).

A backend scores a batch of (query, document) pairs; a document is an image, a caption, or both, as
the backend declares. Higher scores mean more relevant. Backends are registered with
:func:`register` and built with :func:`create`; the rest of the pipeline only sees :class:`Reranker`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# RagVL's prompts (arXiv 2407.21439): P("Yes") to "is this image relevant to the question?".
RAGVL_PROMPT_CAPTION = (
    "Image Caption: {caption}\nQuestion: {query}\n"
    "Based on the image and its caption, is the image relevant to the question? Answer 'Yes' or 'No'."
)
RAGVL_PROMPT = "Question: {query}\nIs the image relevant to the question? Answer 'Yes' or 'No'."


@dataclass(frozen=True)
class RerankerSpec:
    """Everything a backend needs to build itself in a worker (plain data, picklable)."""

    backend: str
    model: str | None = None  # HF backends: local dir, s3 dir, or hub id
    revision: str | None = None
    trust_remote_code: bool = False
    lora_adapter: str | None = None
    clip_model: Any = None  # operators.models.ResolvedModel for the clip backend
    prompt: str = RAGVL_PROMPT_CAPTION
    prompt_no_caption: str = RAGVL_PROMPT
    positive_token: str = "Yes"
    negative_token: str = "No"
    use_caption: bool = True
    max_length: int = 512
    # vlm_yesno: share each doc's image + prompt prefix (one vision pass, one prefix KV cache) across its
    # queries: "auto" (where the model supports it), "on" (error if it cannot), "off" (every pair in full).
    prefix_sharing: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)


class RerankerLoadError(RuntimeError):
    """A reranker model could not be loaded (never replaced by a random model)."""


class Reranker(ABC):
    """Scores (query, document) pairs. Subclasses set ``name`` and what documents they need.

    :meth:`score` checks the batch against what the class declares (``needs_image``, ``needs_caption``) and
    then calls :meth:`_score`, so a backend only implements its model call on valid, non-empty input.
    """

    name: ClassVar[str]
    needs_image: ClassVar[bool] = True
    needs_caption: ClassVar[bool] = False
    # Whether ``rerank.model`` (an HF checkpoint) is required; config validation reads it from the registry.
    needs_model: ClassVar[bool] = False

    def __init__(self, spec: RerankerSpec, device: str = "cpu", precision: str = "fp32") -> None:
        self.spec, self.device, self.precision = spec, device, precision

    def score(self, queries: Sequence[str], images: Sequence[Image.Image | None],
              captions: Sequence[str | None]) -> np.ndarray:
        """One float per pair, higher = more relevant; raises on failure (the caller isolates rows).

        Raises ``ValueError`` when the three sequences differ in length, or a pair lacks its query text or
        a document part the backend needs. An empty batch scores to an empty array without a model call.
        """
        if not (len(queries) == len(images) == len(captions)):
            raise ValueError(f"{self.name}: {len(queries)} queries, {len(images)} images, "
                             f"{len(captions)} captions")
        for i, (q, im, c) in enumerate(zip(queries, images, captions, strict=True)):
            if self.needs_image and im is None:
                raise ValueError(f"{self.name} reranker needs an image for every pair (pair {i} has none)")
            if self.needs_caption and c is None:
                raise ValueError(f"{self.name} needs a caption for every pair (pair {i} has none)")
            if q is None:
                raise ValueError(f"{self.name}: pair {i} has no query text")
        if not queries:
            return np.zeros(0, dtype=np.float32)
        return self._score(queries, images, captions)

    @abstractmethod
    def _score(self, queries: Sequence[str], images: Sequence[Image.Image | None],
               captions: Sequence[str | None]) -> np.ndarray:
        """The backend's scores for a checked, non-empty batch (same contract as :meth:`score`)."""

    def rank(self, query: str, images: Sequence[Image.Image | None],
             captions: Sequence[str | None]) -> list[tuple[int, float, int]]:
        """``(index, score, rank)`` for one query's documents, best first (ties by index)."""
        s = self.score([query] * len(images), images, captions)
        order = sorted(range(len(s)), key=lambda i: (-float(s[i]), i))
        return [(i, float(s[i]), r + 1) for r, i in enumerate(order)]


def distinct_images(images: Sequence[Image.Image]) -> tuple[list[Image.Image], list[int]]:
    """Each distinct image object once, and per pair its position in that list.

    Pairs of one doc share its decoded image object, so a backend can run its vision side once per doc.
    """
    pos_of: dict[int, int] = {}
    uniq: list[Image.Image] = []
    for im in images:
        if id(im) not in pos_of:
            pos_of[id(im)] = len(uniq)
            uniq.append(im)
    return uniq, [pos_of[id(im)] for im in images]


REGISTRY: dict[str, type[Reranker]] = {}


def register(name: str) -> Callable[[type[Reranker]], type[Reranker]]:
    """Class decorator: make a :class:`Reranker` subclass the backend ``name``."""

    def deco(cls: type[Reranker]) -> type[Reranker]:
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ValueError(f"reranker backend {name!r} registered twice")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


def backends() -> dict[str, type[Reranker]]:
    """Every registered backend by name: the one list of valid ``rerank.backend`` values.

    Cheap: the backend modules import torch/transformers only when a model is built or called.
    """
    from operators import rerankers  # noqa: F401 - importing the package registers the backends

    return dict(REGISTRY)


def create(spec: RerankerSpec, device: str = "cpu", precision: str = "fp32") -> Reranker:
    known = backends()
    try:
        cls = known[spec.backend]
    except KeyError:
        raise ValueError(f"rerank.backend: unknown backend {spec.backend!r}; known: {sorted(known)}") from None
    return cls(spec, device, precision)


def torch_dtype(precision: str) -> Any:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
