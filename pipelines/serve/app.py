"""The HTTP ingress of ``mmrerank serve``: answers from the published run, and live for unseen queries.

* ``GET /v1/results/{query_id}``: the precomputed reranked list of the published run, held in memory
  in columnar form (:class:`ResultsStore`).
* ``POST /v1/search``: the live path (:mod:`pipelines.serve.live`): the batch job's own operators embed the
  text, search every index shard, read the candidates' content by ``(shard, row)``, rerank, fuse and select.
* ``POST /v1/rerank`` (Cohere v1, Jina: text and image documents) and ``POST /v2/rerank`` (Cohere v2):
  the request and response shapes of those APIs, so their SDKs and integrations work unchanged.
* ``GET /healthz``, ``GET /v1/runs/current``.
* ``GET /`` and ``/v1/explore/*``, ``/v1/docs/*``: the results explorer page, its views, doc metadata and
  thumbnails (:mod:`pipelines.explorer`).

Hot reload: a background task polls ``LATEST``; a new run is loaded and verified off the request path
and swapped in with one assignment; an incomplete or corrupt run is refused, the old one keeps serving
and ``/healthz`` reports the refusal. The model deployments batch requests with ``@serve.batch``.
"""

# No `from __future__ import annotations` here: FastAPI must see real types on the ingress methods.
import asyncio
import base64
import logging
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.responses import Response

from operators.storage import Storage, scheme_of
from pipelines import explorer
from pipelines.explorer.views import MAX_SUGGESTIONS, DocsRequest, Explorer, LikeRequest
from pipelines.serve.http import install
from pipelines.serve.live import LiveModels
from pipelines.serve.schemas import (
    IMAGE_FIELDS,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankV2Request,
    SearchRequest,
    rerank_meta,
)
from pipelines.serve.store import ResultsStore, load_store

log = logging.getLogger(__name__)


class ServeSettings(BaseModel):
    """Limits and placement of the app; every limit answers 4xx with a message, never a 500."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: str
    host: str = "127.0.0.1"
    port: int = Field(default=8000, gt=0, lt=65536)
    reload_interval_s: float = Field(default=10.0, gt=0)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    max_text_chars: int = Field(default=2000, gt=0)
    max_top_k: int = Field(default=1000, gt=0)
    max_top_n: int = Field(default=100, gt=0)
    max_documents: int = Field(default=100, gt=0)
    max_ongoing_requests: int = Field(default=32, gt=0)
    max_queued_requests: int = Field(default=64, gt=0)
    allowed_url_schemes: tuple[str, ...] = ("s3",)  # image_url fetches; file/http are refused (no SSRF/LFI)
    device: str = "auto"
    # "direct": the ingress replica itself listens on host:port (Serve's direct ingress), one HTTP hop
    # less than "proxy" (Serve's HTTP proxy actor in front): about a fifth of the CPU per lookup here
    # (benchmarks/README). "proxy" for several ingress replicas behind one port, or a multi-node cluster.
    ingress: Literal["direct", "proxy"] = "direct"


# --- the HTTP ingress ----------------------------------------------------------------------------------

api = FastAPI(title="mmrerank", version="0.1.0",
              description="Precomputed reranked multimodal results, and live search + rerank.")


install(api)  # before @serve.ingress(api) below: it freezes a pickled copy of the app


@serve.deployment(logging_config={"enable_access_log": False})
@serve.ingress(api)
class Api:
    def __init__(self, settings: dict[str, Any], models: Any) -> None:
        self.settings = ServeSettings(**settings)
        self.models = models
        self.storage = Storage()
        self.store: ResultsStore | None = None
        self.reload_error: str | None = "loading"
        self.explorer = Explorer(self.storage)  # the explorer page's per-run views and thumbnail cache
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Loading happens on this thread, never on the event loop: requests keep being answered.
        threading.Thread(target=self._poll, daemon=True, name="mmr-reload").start()

    # -- reload -------------------------------------------------------------------------------------
    def _reload_once(self) -> None:
        from operators.runs import read_latest

        current, _ = read_latest(self.storage, self.settings.root)
        if current is None:
            self.reload_error = "nothing published yet"
            return
        if self.store is not None and current["run_id"] == self.store.run_id:
            self.reload_error = None
            return
        try:
            store = load_store(self.storage, self.settings.root)
            if store.index_uri:
                # Load the live models for the new run before switching anything.
                self.models.load.remote(store.run_id, store.config, store.index_uri,
                                        store.clip_vectors).result(timeout_s=600)
        except Exception as e:  # noqa: BLE001 - keep serving the old run, say why in /healthz
            self.reload_error = f"refused run {current['run_id']}: {type(e).__name__}: {e}"
            log.warning("%s", self.reload_error)
            return
        with self._lock:
            self.store, self.reload_error = store, None  # the swap: one assignment
        log.info("serving run %s (%d result rows)", store.run_id, store.rows)

    def _poll(self) -> None:
        while True:
            try:
                self._reload_once()
            except Exception as e:  # noqa: BLE001 - the poller must survive storage hiccups
                self.reload_error = f"{type(e).__name__}: {e}"
            if self._stop.wait(self.settings.reload_interval_s):
                return

    def _store(self) -> ResultsStore:
        store = self.store
        if store is None:
            raise HTTPException(status_code=503, detail=f"no run loaded: {self.reload_error}")
        return store

    # -- endpoints ----------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        store = self.store
        return {"status": "ok" if store is not None and self.reload_error is None
                else "degraded" if store is not None else "loading" if self.reload_error == "loading"
                else "unavailable",
                "run_id": store.run_id if store else None, "reload_error": self.reload_error}

    @api.get("/v1/runs/current")
    async def current(self) -> dict[str, Any]:
        s = self._store()
        return {"run_id": s.run_id, "created": s.created, "rows": s.rows, "queries": len(s.offsets),
                "reranker": s.reranker}

    @api.get("/v1/results/{query_id}")
    async def results(self, query_id: str, top_n: int | None = None) -> dict[str, Any]:
        if top_n is not None and not 0 < top_n <= self.settings.max_top_n:
            raise HTTPException(status_code=422, detail=f"top_n must be in 1..{self.settings.max_top_n}")
        s = self._store()
        rows = s.lookup(query_id, top_n)
        if rows is None:
            raise HTTPException(status_code=404, detail=f"unknown query_id in run {s.run_id}")  # never echoed
        return {"query_id": query_id, "run_id": s.run_id, "reranker": s.reranker, "results": rows}

    # -- the results explorer (pipelines/explorer): the page, its assets, its views, docs ---------------
    @api.get("/", include_in_schema=False)
    async def explorer_page(self) -> Response:
        return self._asset("index.html")

    @api.get("/static/{name}", include_in_schema=False)
    async def explorer_asset(self, name: str) -> Response:
        return self._asset(name)

    def _asset(self, name: str) -> Response:
        found = explorer.asset(name)
        if found is None:
            raise HTTPException(status_code=404, detail="no such asset")
        return Response(found[0], media_type=found[1], headers=explorer.asset_headers(name))

    @api.get("/v1/explore/run")
    async def explore_run(self) -> dict[str, Any]:
        view = await asyncio.to_thread(self.explorer.view, self._store())
        return {**view.facts(), "reload_error": self.reload_error}

    @api.get("/v1/explore/queries")
    async def explore_queries(self, prefix: str = "", limit: int = 20) -> dict[str, Any]:
        if len(prefix) > self.settings.max_text_chars or not 0 < limit <= MAX_SUGGESTIONS:
            raise HTTPException(status_code=422, detail=f"prefix too long or limit not in 1..{MAX_SUGGESTIONS}")
        view = await asyncio.to_thread(self.explorer.view, self._store())
        return {"query_ids": await asyncio.to_thread(view.suggest, prefix, limit)}

    @api.get("/v1/explore/queries/{query_id}")
    async def explore_query(self, query_id: str) -> dict[str, Any]:
        view = await asyncio.to_thread(self.explorer.view, self._store())
        out = await asyncio.to_thread(view.query, query_id)
        if out is None:
            raise HTTPException(status_code=404, detail="unknown query_id in the served run")
        return out

    @api.post("/v1/explore/like")
    async def explore_like(self, req: LikeRequest) -> dict[str, Any]:
        self._limits("", req.top_k, req.top_n)
        s = self._store()
        found = await self.models.like.remote(req.doc_id, req.top_k)
        if found is None:
            raise HTTPException(status_code=404, detail="unknown doc_id in the served run")
        out: dict[str, Any] = {"run_id": s.run_id, "doc_id": req.doc_id, "caption": found["caption"],
                               "retrieval": [{"rank": i + 1, "doc_id": h["doc_id"], "retrieval_score": h["retrieval_score"]}
                                             for i, h in enumerate(found["hits"])],
                               "reranked": None, "reranker": s.reranker, "timing": found["timing"]}
        if req.rerank and found["caption"]:  # a text reranker needs a text query: the doc's own caption
            rr = await self.models.rerank_hits.remote(found["caption"], found["hits"], req.top_n)
            out.update(reranked=rr["results"], reranker=rr["reranker"], timing={**found["timing"], **rr["timing"]})
        return out

    @api.post("/v1/docs")
    async def docs(self, req: DocsRequest) -> dict[str, Any]:
        s = self._store()
        metas = await self.models.docs_meta.remote(req.doc_ids)
        return {"run_id": s.run_id, "docs": [m for m in metas if m is not None]}

    # Registered before /v1/docs/{doc_id:path}, which would otherwise take ".../thumbnail" as part of the id.
    @api.get("/v1/docs/{doc_id:path}/thumbnail", include_in_schema=False)
    async def doc_thumbnail(self, doc_id: str, size: int | None = None) -> Response:
        from pipelines.explorer.docs import check_size

        try:
            px = check_size(size)
        except ValueError as e:
            raise HTTPException(status_code=422, detail=str(e)) from None
        s = self._store()
        key = (s.run_id, doc_id, px)
        data = self.explorer.thumbs.get(key)
        cache = "hit" if data is not None else "miss"
        if data is None:
            got = await self.models.thumbnail.remote(doc_id, px)
            if "error" in got:
                raise HTTPException(status_code=422, detail=f"the stored image does not decode: {got['error']}")
            if got["data"] is None:
                raise HTTPException(status_code=404, detail="unknown doc_id in the served run")
            data = got["data"]
            self.explorer.thumbs.put(key, data)
        # X-Cache: whether this replica's thumbnail cache answered (operators and the tests can count hits).
        return Response(data, media_type="image/jpeg", headers={**explorer.thumbnail_headers(), "X-Cache": cache})

    @api.get("/v1/docs/{doc_id:path}")
    async def doc(self, doc_id: str) -> dict[str, Any]:
        s = self._store()
        (meta,) = await self.models.docs_meta.remote([doc_id])
        if meta is None:
            raise HTTPException(status_code=404, detail="unknown doc_id in the served run")
        return {**meta, "run_id": s.run_id}

    def _limits(self, text: str, top_k: int | None = None, top_n: int | None = None) -> None:
        st = self.settings
        if len(text) > st.max_text_chars:
            raise HTTPException(status_code=422, detail=f"text has {len(text)} characters, max {st.max_text_chars}")
        if top_k is not None and top_k > st.max_top_k:
            raise HTTPException(status_code=422, detail=f"top_k must be <= {st.max_top_k}")
        if top_n is not None and top_n > st.max_top_n:
            raise HTTPException(status_code=422, detail=f"top_n must be <= {st.max_top_n}")

    @api.post("/v1/search")
    async def search(self, req: SearchRequest) -> dict[str, Any]:
        self._limits(req.text, req.top_k, req.top_n)
        s = self._store()
        t0 = time.perf_counter()
        found = await self.models.search.remote(req.text, req.top_k)
        out: dict[str, Any] = {"run_id": s.run_id, "text": req.text}
        if req.rerank:
            rr = await self.models.rerank_hits.remote(req.text, found["hits"], req.top_n)
            out.update(results=rr["results"], reranker=rr["reranker"], timing={**found["timing"], **rr["timing"]})
        else:
            hits = found["hits"][: req.top_n] if req.top_n else found["hits"]
            out.update(results=[{"rank": i + 1, "doc_id": h["doc_id"], "retrieval_score": h["retrieval_score"]}
                                for i, h in enumerate(hits)], timing=found["timing"])
        out["timing"]["total_ms"] = 1000 * (time.perf_counter() - t0)
        return out

    async def _rerank(self, query: str, documents: list[Any], top_n: int | None,
                      ) -> tuple[str, list[RerankDocument], list[int], list[float]]:
        """What both rerank endpoints share: the limits, images decoded off the event loop, the scores.
        Returns the served reranker's name, the documents, their order (best first, cut to top_n), the scores."""
        st = self.settings
        self._limits(query, None, top_n)
        if len(documents) > st.max_documents:
            raise HTTPException(status_code=422, detail=f"{len(documents)} documents, max {st.max_documents}")
        store = self._store()
        needs = await self.models.needs.remote()
        if not needs["scores"]:
            raise HTTPException(status_code=422, detail="the served run has rerank.backend: none (nothing reranks)")
        docs = [RerankDocument(text=d) if isinstance(d, str) else d for d in documents]
        prepared = []
        for i, d in enumerate(docs):
            if d.text is not None and len(d.text) > st.max_text_chars:
                raise HTTPException(status_code=422, detail=f"documents[{i}].text is longer than {st.max_text_chars}")
            image = None
            if needs["image"]:
                image = await asyncio.to_thread(self._image, i, d, needs["decode"])  # off the event loop
            if needs["caption"] and not d.text:
                raise HTTPException(status_code=422, detail=f"documents[{i}]: this reranker needs text")
            prepared.append((image, d.text))
        scores = [float(s) for s in await self.models.rerank_docs.remote(query, prepared)]
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return store.reranker, docs, order[:top_n] if top_n is not None else order, scores

    @api.post("/v1/rerank", response_model_exclude_none=True)
    async def rerank(self, req: RerankRequest) -> RerankResponse:
        """Cohere v1 / Jina: ``documents`` are strings or objects (text, image); ``return_documents`` echoes them."""
        served, docs, order, scores = await self._rerank(req.query, req.documents, req.top_n)
        return RerankResponse(id=str(uuid.uuid4()), model=served, meta=rerank_meta("1", served, req),
                              results=[RerankResult(index=i, relevance_score=scores[i],
                                                    document=docs[i] if req.return_documents else None)
                                       for i in order])

    @api.post("/v2/rerank", response_model_exclude_none=True)
    async def rerank_v2(self, req: RerankV2Request) -> RerankResponse:
        """Cohere v2 (``cohere.ClientV2(...).rerank``): the same scores as ``/v1/rerank``."""
        served, _, order, scores = await self._rerank(req.query, req.documents, req.top_n)
        return RerankResponse(id=str(uuid.uuid4()), model=served, meta=rerank_meta("2", served, req),
                              results=[RerankResult(index=i, relevance_score=scores[i]) for i in order])

    def _image(self, i: int, d: RerankDocument, limits: tuple[int, tuple[str, ...], int]) -> Any:
        from operators.contracts import RejectError
        from operators.decode import decode_image

        field = next((f for f in IMAGE_FIELDS if getattr(d, f)), None)
        if field is None:
            raise HTTPException(status_code=422, detail=f"documents[{i}]: this reranker needs an image")
        value: str = getattr(d, field)
        try:
            if field == "image" and value.startswith("data:"):  # RFC 2397: data:[<mediatype>][;base64],<data>
                head, _, payload = value.partition(",")
                if not head.endswith(";base64"):
                    raise HTTPException(status_code=422, detail=f"documents[{i}].image: a data URI must be base64 "
                                                                "(data:image/png;base64,...)")
                data = base64.b64decode(payload, validate=True)
            elif field == "image_url" or (field == "image" and "://" in value):
                if scheme_of(value) not in self.settings.allowed_url_schemes:
                    raise HTTPException(status_code=422, detail=f"documents[{i}].{field}: scheme not allowed "
                                                                f"(allowed: {list(self.settings.allowed_url_schemes)})")
                data = self.storage.read_bytes(value)
            else:  # image_b64, or Jina's image without a scheme: base64 (a local path is not base64: refused)
                data = base64.b64decode(value, validate=True)
            return decode_image(data, *limits)  # the run's embed.max_image_pixels, allowed_formats, max_image_bytes
        except HTTPException:
            raise
        except RejectError as e:
            raise HTTPException(status_code=422, detail=f"documents[{i}]: {e.error_type}: {e.message}") from None
        except Exception as e:  # noqa: BLE001 - bad base64, unreadable URL
            raise HTTPException(status_code=422, detail=f"documents[{i}]: cannot read image: {type(e).__name__}") from None


def direct_ingress_env(port: int) -> dict[str, str]:
    """Serve's direct-ingress flags, read when Serve's modules load in the controller and the ingress replica.

    The port range is just ``port`` (``range(min, max)``): the one ingress replica listens where the user
    asked. The drain before a replica stops is 1 s instead of 30 s: no load balancer has to notice it.
    """
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def build_app(settings: ServeSettings) -> Any:
    """The Serve application graph: the ingress holds a handle to the model deployment."""
    api.state.max_body_bytes = settings.max_body_bytes
    models = LiveModels.options(max_ongoing_requests=settings.max_ongoing_requests * 2).bind(settings.device)
    opts: dict[str, Any] = {"max_ongoing_requests": settings.max_ongoing_requests,
                            "max_queued_requests": settings.max_queued_requests}
    if settings.ingress == "direct":
        opts["ray_actor_options"] = {"runtime_env": {"env_vars": direct_ingress_env(settings.port)}}
    return Api.options(**opts).bind(settings.model_dump(), models)


def _bind(host: str, port: int = 0) -> int | None:
    """The port a listening socket gets on ``host`` (0: any free one), or None when ``port`` is taken."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT leftovers are no owner
        try:
            s.bind((host, port))
        except OSError:
            return None
        return int(s.getsockname()[1])


def _listening(host: str, port: int, deadline_s: float) -> bool:
    import socket

    end = time.monotonic() + deadline_s
    while True:
        try:
            with socket.create_connection((host if host not in ("0.0.0.0", "::") else "127.0.0.1", port), 1.0):
                return True
        except OSError:
            if time.monotonic() > end:
                return False
            time.sleep(0.2)


def start(settings: ServeSettings, blocking: bool = False) -> Any:
    """Start Serve and deploy the app on ``settings.host:port`` (loopback by default).

    ``ingress="direct"``: the ingress replica listens on the port itself; Serve's proxy still runs (it is
    how Serve starts) on a free port of the same host and nothing needs it. ``"proxy"``: the proxy listens.
    """
    if _bind(settings.host, settings.port) is None:
        raise OSError(f"{settings.host}:{settings.port} is already in use")
    if settings.ingress == "direct":
        serve.start(http_options={"host": settings.host, "port": _bind(settings.host)},
                    controller_options={"runtime_env": {"env_vars": direct_ingress_env(settings.port)}},
                    logging_config={"enable_access_log": False})
    else:
        serve.start(http_options={"host": settings.host, "port": settings.port},
                    logging_config={"enable_access_log": False})
    handle = serve.run(build_app(settings), blocking=False, name="mmrerank", route_prefix="/")
    if settings.ingress == "direct" and not _listening(settings.host, settings.port, 30.0):
        raise RuntimeError(
            f"the app is deployed but nothing listens on {settings.host}:{settings.port}: a Serve instance "
            "already running in this Ray cluster was started without direct ingress (run `serve shutdown`, "
            "or use ingress=proxy)")
    log.info("serving on http://%s:%d (%s ingress)", settings.host, settings.port, settings.ingress)
    if blocking:
        from ray.serve._private.utils import wait_for_interrupt

        wait_for_interrupt()  # what serve.run(blocking=True) does after deploying
    return handle


def app_from_env(args: dict[str, Any] | None = None) -> Any:
    """Application builder for RayService / `serve run pipelines.serve:app_from_env root=...`:
    settings from the builder args, else from MMRERANK_* environment variables."""
    import os

    if args:
        return build_app(ServeSettings(**{"ingress": "proxy", **args}))
    settings = ServeSettings(root=os.environ["MMRERANK_ROOT"],
                             reload_interval_s=float(os.environ.get("MMRERANK_RELOAD_INTERVAL_S", "10")),
                             host=os.environ.get("MMRERANK_HOST", "127.0.0.1"),
                             port=int(os.environ.get("MMRERANK_PORT", "8000")),
                             ingress="proxy")  # the cluster's Serve (and its proxy) is configured there
    return build_app(settings)
