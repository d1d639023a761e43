"""What every stage of one run resolves from its config, resolved once: storage, the embedding model, the
reranker's spec and label. The nightly job (``pipelines.run``) and the served run (``pipelines.serve``)
build one :class:`RunContext` and hand its parts to the stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from operators.models import ResolvedModel, resolve_model
from operators.rerankers.base import RAGVL_PROMPT, RAGVL_PROMPT_CAPTION, RerankerSpec
from operators.storage import Storage, StorageOptions
from pipelines.config import Config, RerankConfig


def reranker_spec(rc: RerankConfig, cfg: Config, storage_options: StorageOptions | None = None) -> RerankerSpec:
    """The reranker as its workers build it (plain data); resolves the clip backend's model."""
    opts = storage_options if storage_options is not None else cfg.storage.options()
    clip = resolve_model(rc.clip_model, opts) if rc.backend == "clip" else None
    return RerankerSpec(
        backend=rc.backend, model=rc.model, revision=rc.revision, trust_remote_code=rc.trust_remote_code,
        lora_adapter=rc.lora_adapter, clip_model=clip,
        prompt=rc.prompt or RAGVL_PROMPT_CAPTION, prompt_no_caption=rc.prompt_no_caption or RAGVL_PROMPT,
        positive_token=rc.positive_token, negative_token=rc.negative_token, use_caption=rc.use_caption,
        max_length=rc.max_length, prefix_sharing=rc.prefix_sharing, extra=dict(rc.options))


def reranker_label(rc: RerankConfig) -> str:
    """The ``reranker`` value of the results contract."""
    if rc.backend == "clip":
        return f"clip:{rc.clip_model.name}"
    return rc.backend if rc.backend == "none" else f"{rc.backend}:{rc.model}"


@dataclass
class RunContext:
    """One run's config and what is derived from it, each computed once and on first use."""

    cfg: Config
    storage_options: StorageOptions = field(init=False)
    storage: Storage = field(init=False)

    def __post_init__(self) -> None:
        self.storage_options = self.cfg.storage.options()
        self.storage = Storage(self.storage_options)

    @cached_property
    def embed_model(self) -> ResolvedModel:
        """``embed.model`` resolved (a missing checkpoint is a clear error here, never a random model)."""
        return resolve_model(self.cfg.embed.model, self.storage_options)

    @cached_property
    def reranker(self) -> RerankerSpec:
        return reranker_spec(self.cfg.rerank, self.cfg, self.storage_options)

    @property
    def reranker_label(self) -> str:
        return reranker_label(self.cfg.rerank)
