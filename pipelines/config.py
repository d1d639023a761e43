"""Typed configuration: one YAML file validated into pydantic models before any work starts.

Unknown keys, wrong types and impossible values raise :class:`ConfigError` whose message names the
field path (``embed.batch_size: Input should be greater than 0``). Secrets never go in here
except through ``storage``, whose secret fields are excluded from every dump.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from operators.contracts import ALLOWED_FORMATS, DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from operators.decode import DecodeLimits
from operators.models import ModelSpec
from operators.rerankers import backends as reranker_backends
from operators.storage import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_READ_TIMEOUT_S,
    DEFAULT_RETRIES,
    DEFAULT_RETRY_DEADLINE_S,
    StorageOptions,
    normalize,
)


class ConfigError(ValueError):
    """Configuration is invalid; the message names every offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class StorageConfig(_Strict):
    """S3 settings; anything left out comes from the standard AWS environment / profile."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    access_key_id: str | None = Field(default=None, repr=False, exclude=True)
    secret_access_key: str | None = Field(default=None, repr=False, exclude=True)
    session_token: str | None = Field(default=None, repr=False, exclude=True)
    anon: bool = False
    # Transient endpoint failures (refused/reset connections, timeouts, 5xx, throttling): botocore's attempts
    # per request, then retries with backoff until retry_deadline_s from the first failure (a gateway restart
    # is ridden out), then a clear error naming the URI, the endpoint and the budget.
    retries: int = Field(default=DEFAULT_RETRIES, ge=1, le=20,
                         description="attempts per S3 request (first one included)")
    connect_timeout: float = Field(default=DEFAULT_CONNECT_TIMEOUT_S, gt=0, le=600, description="seconds")
    read_timeout: float = Field(default=DEFAULT_READ_TIMEOUT_S, gt=0, le=3600, description="seconds")
    retry_deadline_s: float = Field(default=DEFAULT_RETRY_DEADLINE_S, gt=0, le=86400,
                                    description="seconds a failing S3 request is retried, from its first failure")

    def options(self) -> StorageOptions:
        return StorageOptions(
            endpoint_url=self.endpoint_url,
            region=self.region,
            profile=self.profile,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
            session_token=self.session_token,
            anon=self.anon,
            retries=self.retries,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            retry_deadline_s=self.retry_deadline_s,
        )


class RayConfig(_Strict):
    """Where the job runs. ``address: null`` starts a local Ray instance."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, gt=0)
    object_store_memory_mb: int | None = Field(default=None, gt=64)
    # Shipped to every worker; AWS_* variables present in the driver are forwarded automatically.
    env_vars: dict[str, str] = Field(default_factory=dict)
    progress_bars: bool = True
    # Watchdog: fail a stage when no block (read, decode, encode, search, score, write) completes for
    # this long. Covers model loading too, so leave room for the slowest checkpoint load. null = off.
    stall_timeout_s: float | None = Field(default=1800, gt=0)

    @field_validator("env_vars")
    @classmethod
    def _no_secrets(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if any(s in k.upper() for s in ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY"))]
        if bad:
            raise ValueError(f"{bad}: credentials must not go in the config (they would reach Ray's GCS and "
                             "dashboard); give workers credentials through their node environment")
        return v


class EmbedConfig(_Strict):
    """Embedding stage: corpus images and query texts through one open_clip model."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    batch_size: int = Field(default=32, gt=0, le=65536)
    dtype: Literal["float32", "float16"] = "float32"
    # Actor pool size: "auto" = one per GPU on GPU clusters; on CPU two for the corpus (one on a 1-CPU node),
    # the cores split between them (pipelines.ray_env.actor_pool says why), one for the queries.
    num_actors: int | Literal["auto"] = "auto"
    # Logical CPUs one embedder actor holds. Keep < the node's CPUs so read/decode/write tasks run. With
    # num_actors "auto" on CPU, at most what leaves room for one read or write task.
    actor_num_cpus: float = Field(default=1.0, gt=0)
    # Torch intra-op threads in a CPU actor: "auto" = node CPUs / CPU actors on that node.
    torch_threads: int | Literal["auto"] = "auto"
    # Read (+decode, when decode is not in the actor) tasks. Differs from actor_num_cpus on purpose: Ray Data
    # fuses a CPU map into the actor stage when their resources match, and decode must overlap with the model.
    decode_num_cpus: float = Field(default=0.5, gt=0)
    # Decode images inside the embedder actor, just before the model, instead of in separate tasks.
    # "auto": on CPU devices (same throughput, and no float32 pixel batches in the object store: peak RSS
    # 6.6 -> 4.2 GB in bench_embed); on GPUs decode runs in parallel CPU tasks so the GPU never waits for it.
    decode_in_actor: bool | Literal["auto"] = "auto"
    write_num_cpus: float = Field(default=0.25, gt=0)
    rows_per_read_task: int = Field(default=256, gt=0)
    write_batch_size: int = Field(default=4096, gt=0)
    max_image_pixels: int = Field(default=DEFAULT_MAX_IMAGE_PIXELS, gt=0)
    max_image_bytes: int = Field(default=DEFAULT_MAX_IMAGE_BYTES, gt=0)
    allowed_formats: tuple[str, ...] = ALLOWED_FORMATS

    @property
    def decode_limits(self) -> DecodeLimits:
        """The image limits of this run, as every decode of it applies them."""
        return DecodeLimits(self.max_image_pixels, tuple(self.allowed_formats), self.max_image_bytes)

    @field_validator("allowed_formats")
    @classmethod
    def _formats(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [f for f in v if f.upper() not in ALLOWED_FORMATS]
        if bad:
            raise ValueError(f"unknown formats {bad}; choose from {list(ALLOWED_FORMATS)}")
        return tuple(f.upper() for f in v)

    @field_validator("num_actors", "torch_threads")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v <= 0:
            raise ValueError("must be > 0 or 'auto'")
        return v


class IndexConfig(_Strict):
    """FAISS index shards built from the corpus embeddings (inner product on unit vectors)."""

    factory: str = Field(default="Flat", min_length=1, description="faiss index_factory string")
    shards: int = Field(default=2, gt=0, le=4096)
    train_sample: int = Field(default=100_000, gt=0, description="vectors sampled (seeded) to train IVF/PQ")
    seed: int = 0
    build_num_cpus: float = Field(default=1.0, gt=0)


class SearchConfig(_Strict):
    """Sharded top-k search of the query embeddings."""

    k: int = Field(default=100, gt=0, le=100_000)
    nprobe: int = Field(default=16, gt=0)
    ef_search: int = Field(default=64, gt=0)
    # Queries per fan-out: faiss's Flat scan is ~20% less efficient at 256 than at 1024 queries a call.
    batch_size: int = Field(default=1024, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # One searcher actor per index shard. Logical CPUs it holds (it is idle between batches) and the
    # faiss threads it uses ("auto": the node's cores split over the shards).
    searcher_num_cpus: float = Field(default=0.5, gt=0)
    searcher_threads: int | Literal["auto"] = "auto"
    # GPU share per searcher when device is cuda (several shards can share one GPU).
    searcher_num_gpus: float = Field(default=0.25, gt=0, le=1)
    router_num_cpus: float = Field(default=0.25, gt=0)
    # Optional precomputed query vectors (query_id, embedding) instead of the query embeddings cache.
    query_embeddings: str | None = None


class FusionConfig(_Strict):
    """How the final score combines reranker and retrieval scores (per query)."""

    method: Literal["none", "weighted", "rrf"] = "none"
    weight: float = Field(default=0.7, ge=0, le=1, description="weighted: share of the (min-max normalised) rerank score")
    rrf_k: int = Field(default=60, gt=0)


class SelectionConfig(_Strict):
    """Which candidates a query keeps, ranked by final score (ties broken by doc_id)."""

    mode: Literal["top_n", "threshold", "top_k_above_threshold"] = "top_n"
    top_n: int = Field(default=10, gt=0)
    threshold: float | None = None
    k: int = Field(default=10, gt=0, description="top_k_above_threshold: at most this many above the threshold")

    @model_validator(mode="after")
    def _threshold(self) -> SelectionConfig:
        if self.mode != "top_n" and self.threshold is None:
            raise ValueError(f"threshold is required with mode {self.mode!r}")
        return self


# rerank.backend: the pipeline's no-rerank value, or a backend name of operators.rerankers' registry.
NO_RERANK = "none"


def rerank_backend_names() -> tuple[str, ...]:
    """The valid ``rerank.backend`` values: :data:`NO_RERANK` and every registered backend."""
    return (NO_RERANK, *sorted(reranker_backends()))


class RerankConfig(_Strict):
    """The reranking stage: one backend by explicit name, batched on an actor pool."""

    backend: str = "clip"  # one of rerank_backend_names(), checked by _backend
    clip_model: ModelSpec = Field(default_factory=lambda: ModelSpec(name="mmr-tiny", seed=1))
    model: str | None = Field(default=None, description="HF backends: local dir, s3:// dir, or hub id")
    revision: str | None = None
    trust_remote_code: bool = False
    lora_adapter: str | None = None
    prompt: str | None = None  # vlm_yesno; default: RagVL's prompt (with or without caption)
    prompt_no_caption: str | None = None  # vlm_yesno: for candidates without a caption
    # Backend-specific options, e.g. vlm_yesno: system_prompt, image_position (first|last), processor_kwargs.
    options: dict[str, Any] = Field(default_factory=dict)
    positive_token: str = "Yes"
    negative_token: str = "No"
    use_caption: bool = True
    max_length: int = Field(default=512, gt=0)
    # vlm_yesno: each doc's image and prompt prefix computed once and shared by its queries (same scores).
    prefix_sharing: Literal["auto", "on", "off"] = Field(
        default="auto", description="vlm_yesno: auto = where the model supports it, on = error if unsupported")
    batch_size: int = Field(default=16, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    num_actors: int | Literal["auto"] = "auto"
    actor_num_cpus: float = Field(default=1.0, gt=0)
    torch_threads: int | Literal["auto"] = "auto"
    # Where candidate images are decoded (once per doc): "auto" = in the reranker actor on CPU devices (no
    # pixel copies through the object store; what measured best there), in CPU tasks before the GPU actors.
    decode_in_actor: bool | Literal["auto"] = "auto"
    decode_num_cpus: float = Field(default=0.5, gt=0, description="CPUs of one decode task (decode_in_actor off)")
    select_buckets: int = Field(default=4, gt=0, le=65536, description="query hash buckets for selection tasks")
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)

    @field_validator("backend", mode="before")
    @classmethod
    def _backend(cls, v: Any) -> Any:
        names = rerank_backend_names()
        if v not in names:
            # The same error (type and text) as a Literal of the names, listed from the registry.
            listed = ", ".join(repr(n) for n in names[:-1]) + f" or {names[-1]!r}"
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": listed})
        return v

    @model_validator(mode="after")
    def _model(self) -> RerankConfig:
        backend = reranker_backends().get(self.backend)  # None for NO_RERANK
        if backend is not None and backend.needs_model and not self.model:
            raise ValueError(f"model is required for backend {self.backend!r}")
        if backend is not None and backend.needs_caption and not self.use_caption:
            raise ValueError(f"the {self.backend} backend scores (query, caption): use_caption must stay true")
        if self.trust_remote_code and not self.revision:
            raise ValueError("trust_remote_code needs a pinned revision (a commit hash)")
        if self.prompt is not None and "{query}" not in self.prompt:
            raise ValueError("prompt must contain {query}")
        if self.prefix_sharing == "on" and self.backend != "vlm_yesno":
            raise ValueError(f"prefix_sharing: on is for the vlm_yesno backend, not {self.backend!r}")
        if self.prefix_sharing == "on" and self.options.get("image_position") == "last":
            raise ValueError("prefix_sharing: on needs the image before the query (options.image_position: first)")
        return self


class LoraConfig(_Strict):
    """LoRA (peft) settings of the vlm_yesno target; ``enabled: auto`` = LoRA unless the base is tiny."""

    enabled: bool | Literal["auto"] = "auto"
    r: int = Field(default=8, gt=0)
    alpha: int = Field(default=16, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    # "auto" keeps full fine-tuning for bases up to this many parameters (the offline tiny models).
    full_finetune_max_params: int = Field(default=20_000_000, gt=0)


class TrainConfig(_Strict):
    """``mmrerank train``: fine-tune the retriever (clip) or the reranker (vlm_yesno) on qrels with Ray Train."""

    target: Literal["clip", "vlm_yesno"]
    # Base weights: clip: an open_clip spec (default embed.model); vlm_yesno: an HF dir / hub id (default
    # rerank.model). The prompt, answer tokens and use_caption of vlm_yesno come from the rerank section.
    clip_model: ModelSpec | None = None
    model: str | None = None
    # Hard negatives / vlm validation candidates: a run directory or a root (its published run).
    candidates: str | None = None
    negatives: Literal["none", "hard", "random"] = "none"
    negatives_per_query: int = Field(default=4, ge=0, le=1000)
    # clip: also train on (caption, image) pairs of the corpus (docs judged for held-out queries left out).
    caption_pairs: bool = False
    heldout_fraction: float = Field(default=0.3, gt=0, lt=1, description="share of query ids never trained on")
    split_seed: int = Field(default=0, ge=0)
    seed: int = Field(default=0, ge=0)
    epochs: int = Field(default=5, gt=0, le=10_000)
    batch_size: int = Field(default=32, gt=0, description="examples per optimiser step, all workers together "
                            "(loss listwise: queries, each with all its positives and negatives)")
    # vlm_yesno: pointwise = RagVL's cross-entropy on each (query, doc) pair's Yes/No answer; listwise = the
    # localized contrastive estimation of Gao et al. 2021 (each positive against its query's negatives).
    loss: Literal["pointwise", "listwise"] = "pointwise"
    lr: float = Field(default=1e-4, gt=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0)
    num_workers: int = Field(default=1, gt=0, le=4096)
    use_gpu: bool | Literal["auto"] = "auto"
    worker_num_cpus: float = Field(default=1.0, gt=0)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                             description="Ray Train run name under <root>/training/ (default: from the config)")
    output: str | None = Field(default=None, description="model directory (default <root>/models/<name>)")

    @field_validator("candidates", "output")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must be a non-empty path or URI")
        return None if v is None else normalize(os.path.expanduser(v))

    @model_validator(mode="after")
    def _target(self) -> TrainConfig:
        if self.negatives == "hard" and not self.candidates:
            raise ValueError("negatives: hard needs candidates (a run directory or root)")
        if self.target == "vlm_yesno":
            if not self.candidates:
                raise ValueError("target vlm_yesno needs candidates (a run directory or root): its validation "
                                 "reranks the held-out queries' candidates")
            if self.negatives == "none":
                raise ValueError("target vlm_yesno needs negatives: hard (RagVL) or random")
        if self.loss == "listwise" and self.target != "vlm_yesno":
            raise ValueError("loss: listwise is for target vlm_yesno (clip is contrastive already)")
        if self.target == "clip" and self.model is not None:
            raise ValueError("model is for target vlm_yesno; target clip takes clip_model")
        if self.target == "vlm_yesno" and self.clip_model is not None:
            raise ValueError("clip_model is for target clip; target vlm_yesno takes model")
        return self


class Config(_Strict):
    """Root of a pipeline config file."""

    root: str = Field(description="Output root URI: embeddings/, indexes/, runs/ and LATEST live here")
    corpus: str | None = Field(default=None, description="URI of a directory (or glob) of corpus Parquet shards")
    queries: str | None = Field(default=None, description="URI of a directory (or glob) of query Parquet shards")
    qrels: str | None = None
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    rerank: RerankConfig = Field(default_factory=RerankConfig)
    train: TrainConfig | None = None

    @field_validator("root", "corpus", "queries", "qrels")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.strip():
            raise ValueError("must be a non-empty path or URI")
        return normalize(os.path.expanduser(v))

    @model_validator(mode="after")
    def _inputs(self) -> Config:
        if self.corpus is None and self.queries is None:
            raise ValueError("at least one of 'corpus' or 'queries' must be set")
        return self

    def redacted_dump(self) -> dict[str, Any]:
        """The resolved config as plain data, with every secret left out."""
        return self.model_dump(mode="json")


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def _resolve_relative(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative local paths in the file are relative to the file's directory, not the cwd."""
    def fix(d: dict[str, Any], key: str) -> None:
        v = d.get(key)
        if isinstance(v, str) and "://" not in v and not os.path.isabs(os.path.expanduser(v)):
            d[key] = str((base / v).resolve())

    for key in ("root", "corpus", "queries", "qrels"):
        fix(data, key)
    if isinstance(data.get("search"), dict):
        data["search"] = dict(data["search"])
        fix(data["search"], "query_embeddings")
    if isinstance(data.get("train"), dict):
        data["train"] = dict(data["train"])
        for key in ("candidates", "output"):
            fix(data["train"], key)
    return data


def parse_config(data: dict[str, Any], source: str = "<dict>", base: Path | None = None) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: top level must be a mapping, got {type(data).__name__}")
    if base is not None:
        data = _resolve_relative(dict(data), base)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def load_config(path: str | os.PathLike[str],
                overrides: Mapping[str, Any] | Iterable[str] | None = None) -> Config:
    """Read and validate a YAML config file; ``overrides`` are merged on top (see :func:`apply_overrides`)."""
    if overrides is not None and not isinstance(overrides, Mapping):
        overrides = dict(map(parse_override, overrides))  # a malformed --set item fails before any file read
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        # Position and problem only: PyYAML's own message quotes the offending line, which can be a credential.
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = "; ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
        raise ConfigError(f"invalid config {p}: not valid YAML{where}: {what or type(e).__name__}") from None
    apply_overrides(data, overrides or {})
    return parse_config(data, str(p), base=p.parent.resolve())


def parse_override(item: str) -> tuple[str, Any]:
    """One ``--set`` item ``key=value`` -> ``(dotted key, value)``; the value is read as YAML.

    ``"embed.batch_size=32"`` -> ``("embed.batch_size", 32)``; ``"rerank.model=null"`` -> ``(..., None)``.
    Raises :class:`ConfigError` when there is no ``=``.
    """
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, value = item.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any] | Iterable[str]) -> dict[str, Any]:
    """Merge overrides into the raw config mapping ``data`` (in place; returned for chaining), before validation.

    ``overrides`` is either ``{dotted key: value}`` or ``--set`` items (``["a.b=1", ...]``, parsed by
    :func:`parse_override`). A dotted key creates the nested mappings it goes through: ``embed.model.seed=3``
    sets ``data["embed"]["model"]["seed"]``. This is how ``mmrerank --set`` and the benchmarks apply ``--set``.
    """
    pairs = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    for key, value in pairs:
        *parents, leaf = key.split(".")
        cur = data
        for part in parents:
            cur = cur.setdefault(part, {})
        cur[leaf] = value
    return data
