"""The rerank endpoints spoken by the clients people already use, over real HTTP against ``mmrerank serve``.

The official ``cohere`` SDK (``cohere.Client`` -> ``/v1/rerank``, ``cohere.ClientV2`` -> ``/v2/rerank``) pointed
at the app with ``base_url`` (no network), and Jina-shaped requests (``{"image": ...}`` / ``{"text": ...}``
documents) sent with httpx. One local Ray and one Serve app for the module, serving two backends in turn: an
image reranker (``clip``, the quickstart's) and a text one (``cross_encoder``, a tiny random BERT); the second
run is published to the same root and hot-reloaded. Every answer is checked against ``/v1/rerank`` and against
the reranker called directly in this process on the same documents.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pytest
import yaml

httpx = pytest.importorskip("httpx")
cohere = pytest.importorskip("cohere")

from tests.helpers import RELOAD_DEADLINE_S, QuickstartRun, serve_app, wait_for  # noqa: E402

N_DOCS = 5  # documents per rerank call
MAX_DOCUMENTS = 8
ATOL = 1e-5  # server (batched, through Ray) vs the reranker called directly here


@dataclass
class Stack:
    out: Path
    base: str
    client: Any  # httpx.Client bound to base
    cfgs: dict[str, Any] = field(default_factory=dict)  # backend -> its run's Config
    run_ids: dict[str, str] = field(default_factory=dict)  # backend -> its run's id


@dataclass
class Served:
    """The app serving one backend's run, and one rerank call's inputs with their direct scores."""

    backend: str
    base: str
    client: Any
    label: str  # the served reranker's name
    query: str
    documents: list[Any]  # as a Jina / Cohere v1 client sends them
    direct: np.ndarray  # the reranker called directly on (query, documents)

    def jina(self, **kw: Any) -> Any:
        body = {"model": "jina-reranker-m0", "query": self.query, "documents": self.documents, **kw}
        return self.client.post("/v1/rerank", json=body)


def _config(out: Path, backend: str) -> Any:
    from pipelines.config import parse_config
    from pipelines.quickstart import DEFAULT_CONFIG
    from tests.tiny_hf import save_tiny_bert

    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data.update(root=str(out / "out"), corpus=str(out / "sample" / "corpus"), queries=str(out / "sample" / "queries"))
    data.pop("qrels", None)
    data["ray"]["progress_bars"] = False
    if backend == "cross_encoder":  # one actor: its start imports torch, most of a rerank this small
        data["rerank"].update(backend="cross_encoder", model=str(save_tiny_bert(out / "tiny-ce")), batch_size=8,
                              num_actors=1)
    return parse_config(data, str(DEFAULT_CONFIG))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, quickstart_run: QuickstartRun, ray_serve: None) -> Iterator[Stack]:
    """The session's quickstart run (clip, the shipped config; copied: this module publishes a second run into
    its root), served by one app for the module."""
    qs = quickstart_run.copy(tmp_path_factory.mktemp("serve-clients") / "qs")
    cfg = _config(qs.out, "clip")
    with serve_app(cfg.root, healthy=lambda body: body.get("run_id") == qs.run_id,
                   max_documents=MAX_DOCUMENTS) as settings:
        base = f"http://{settings.host}:{settings.port}"
        with httpx.Client(base_url=base, timeout=60.0) as client:
            yield Stack(out=qs.out, base=base, client=client, cfgs={"clip": cfg},
                        run_ids={"clip": qs.run_id, "cross_encoder": "r-ce"})


def _data_uri(data: bytes) -> str:
    kind = "png" if data.startswith(b"\x89PNG") else "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def _direct(cfg: Any, query: str, images: list[bytes | None], texts: list[str | None]) -> np.ndarray:
    """The run's reranker built here, one pair per call (no batching), on what the server decodes."""
    from operators.decode import decode_image
    from operators.rerankers.base import create
    from pipelines.context import reranker_spec

    spec = reranker_spec(cfg.rerank, cfg)
    backend = create(spec, "cpu", "fp32")
    e = cfg.embed
    out = []
    for data, text in zip(images, texts, strict=True):
        img = decode_image(data, e.max_image_pixels, e.allowed_formats, e.max_image_bytes) \
            if backend.needs_image else None
        out.append(backend.score([query], [img], [text if spec.use_caption else None])[0])
    return np.asarray(out, np.float64)


@pytest.fixture(scope="module", params=["clip", "cross_encoder"])
def served(request: pytest.FixtureRequest, stack: Stack) -> Served:
    """Publish (once) and serve the backend's run; the app hot-reloads it. Tests are grouped per backend."""
    from operators.storage import Storage
    from pipelines.context import reranker_label
    from pipelines.publish import advance_latest
    from pipelines.run import run

    backend = request.param
    run_id = stack.run_ids[backend]
    if backend not in stack.cfgs:
        stack.cfgs[backend] = _config(stack.out, backend)
        assert run(stack.cfgs[backend], run_id=run_id).published
    else:
        advance_latest(Storage(), stack.cfgs[backend].root, run_id)
    cfg = stack.cfgs[backend]
    wait_for(lambda: stack.client.get("/healthz").json().get("run_id") == run_id, RELOAD_DEADLINE_S,
          f"/healthz serving {run_id}")
    rows = ds.dataset(cfg.corpus).to_table(columns=["doc_id", "image", "text"]).to_pylist()[:N_DOCS]
    query = ds.dataset(cfg.queries).to_table().column("text")[0].as_py()
    images: list[bytes | None] = [r["image"] for r in rows]
    texts: list[str | None] = [r["text"] for r in rows]
    if backend == "clip":  # every form Jina and our own API send an image in; one with its caption
        docs: list[Any] = [{"image": _data_uri(images[0])}, {"image": base64.b64encode(images[1]).decode()},
                           {"image_b64": base64.b64encode(images[2]).decode()},
                           {"image": _data_uri(images[3]), "text": texts[3]}, {"image": _data_uri(images[4])}]
        texts = [None, None, None, texts[3], None]
    else:  # Cohere's strings and Jina's {"text": ...}
        docs = [t if i % 2 == 0 else {"text": t} for i, t in enumerate(texts)]
    return Served(backend=backend, base=stack.base, client=stack.client, label=reranker_label(cfg.rerank),
                  query=query, documents=docs, direct=_direct(cfg, query, images, texts))


def _ranked(results: list[Any]) -> tuple[list[int], np.ndarray]:
    """(indices, scores) of results given as dicts (raw HTTP) or SDK objects."""
    get = (lambda r, k: r[k]) if results and isinstance(results[0], dict) else getattr
    return [get(r, "index") for r in results], np.array([get(r, "relevance_score") for r in results], np.float64)


def _reference(s: Served) -> tuple[list[int], np.ndarray]:
    """The plain Jina-shaped ``/v1/rerank`` answer for every document; itself checked against the direct scores."""
    r = s.jina()
    assert r.status_code == 200, r.text[:300]
    idx, scores = _ranked(r.json()["results"])
    assert sorted(idx) == list(range(N_DOCS))
    np.testing.assert_allclose(scores, s.direct[idx], rtol=0, atol=ATOL)
    assert list(scores) == sorted(scores, reverse=True)
    return idx, scores


def test_jina_request_matches_direct_scores(served: Served) -> None:
    idx, scores = _reference(served)
    assert len(set(np.round(scores, 6))) > 1, "every document scored the same: the order says nothing"
    assert idx == sorted(range(N_DOCS), key=lambda i: (-served.direct[i], i))
    r = served.jina(top_n=2, return_documents=True)
    assert r.status_code == 200, r.text[:300]
    body = r.json()
    assert body["model"] == served.label and body["meta"]["api_version"] == {"version": "1"}
    assert [x["index"] for x in body["results"]] == idx[:2]
    for x in body["results"]:  # echoed as sent (a string document comes back as {"text": ...})
        d = served.documents[x["index"]]
        assert x["document"] == (d if isinstance(d, dict) else {"text": d})


def test_cohere_v1_sdk(served: Served) -> None:
    idx, scores = _reference(served)
    co = cohere.Client(api_key="not-checked", base_url=served.base, timeout=60, max_retries=0)
    resp = co.rerank(model="rerank-v3.5", query=served.query, documents=served.documents, top_n=2,
                     return_documents=True, max_chunks_per_doc=10)
    got_idx, got = _ranked(resp.results)
    assert got_idx == idx[:2]
    np.testing.assert_allclose(got, scores[:2], rtol=0, atol=1e-6)
    assert resp.id and resp.meta.api_version.version == "1"
    assert resp.model == served.label  # type: ignore[attr-defined] - an extra field, kept by the SDK
    warnings = resp.meta.warnings or []
    assert any("not served here" in w for w in warnings) and any("max_chunks_per_doc" in w for w in warnings)
    if served.backend == "cross_encoder":
        sent = [d if isinstance(d, str) else d["text"] for d in served.documents]
        assert [r.document.text for r in resp.results] == [sent[i] for i in got_idx]
    # What an integration sends: LangChain passes its unset options as None, which the SDK sends as null.
    full = co.rerank(model=None, query=served.query, documents=served.documents, top_n=None,
                     return_documents=None, max_chunks_per_doc=None, rank_fields=None)
    assert _ranked(full.results)[0] == idx and full.meta.warnings is None
    assert all(r.document is None for r in full.results)


def test_cohere_v2_sdk(served: Served) -> None:
    idx, scores = _reference(served)
    co = cohere.ClientV2(api_key="not-checked", base_url=served.base, timeout=60, max_retries=0)
    resp = co.rerank(model=served.label, query=served.query, documents=served.documents, top_n=3,
                     max_tokens_per_doc=256, priority=None)
    got_idx, got = _ranked(resp.results)
    assert got_idx == idx[:3]
    np.testing.assert_allclose(got, scores[:3], rtol=0, atol=1e-6)
    assert resp.id and resp.meta.api_version.version == "2"
    assert resp.model == served.label  # type: ignore[attr-defined]
    assert resp.meta.warnings and all("max_tokens_per_doc" in w for w in resp.meta.warnings), resp.meta
    assert all(getattr(r, "document", None) is None for r in resp.results)


def test_errors_are_4xx_the_sdks_raise_with_our_message(served: Served) -> None:
    from cohere.errors import UnprocessableEntityError

    v1 = cohere.Client(api_key="not-checked", base_url=served.base, timeout=60, max_retries=0)
    v2 = cohere.ClientV2(api_key="not-checked", base_url=served.base, timeout=60, max_retries=0)
    with pytest.raises(UnprocessableEntityError) as e:
        v2.rerank(model="m", query=served.query, documents=[served.documents[0]] * (MAX_DOCUMENTS + 1))
    assert e.value.status_code == 422 and f"max {MAX_DOCUMENTS}" in e.value.body["message"]
    with pytest.raises(UnprocessableEntityError) as e:
        v1.rerank(query="", documents=served.documents)
    assert "query" in e.value.body["message"]
    if served.backend == "clip":
        wrong, word = ["a plain string is text, not an image"], "needs an image"
    else:
        wrong, word = [{"image": served.documents[0]}], "needs text"
    with pytest.raises(UnprocessableEntityError) as e:
        v2.rerank(model="m", query=served.query, documents=wrong)
    assert word in e.value.body["message"]

    refusals: list[tuple[Any, str]] = [
        ({"image": "x", "image_b64": "eA=="}, "not several"),
        ({"title": "a field we do not know", "text": "t"}, "Extra inputs"),
        ({}, "needs text or an image"),
    ]
    if served.backend == "clip":
        refusals += [
            ({"image": "file:///etc/passwd"}, "scheme not allowed"),
            ({"image": "http://169.254.169.254/latest/meta-data"}, "scheme not allowed"),
            ({"image": "/etc/passwd"}, "cannot read image"),  # no scheme: base64, and a path is not
            ({"image": "data:image/png,%89PNG"}, "must be base64"),
            ({"image": "data:image/png;base64,!!!"}, "cannot read image"),
            ({"image": base64.b64encode(b"GIF89a-not-really").decode()}, "documents[0]"),
        ]
    for doc, word in refusals:
        r = served.client.post("/v1/rerank", json={"query": "q", "documents": [doc]})
        assert r.status_code == 422, (doc, r.status_code, r.text[:300])
        body = r.json()
        assert word in body["message"] and body["detail"], (doc, body)
        assert "passwd" not in body["message"] and "169.254" not in body["message"]  # never echoed


def test_openapi_describes_both_document_shapes(stack: Stack) -> None:
    spec = stack.client.get("/openapi.json").json()
    assert {"/v1/rerank", "/v2/rerank"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    for req in ("RerankRequest", "RerankV2Request"):
        shapes = schemas[req]["properties"]["documents"]["items"]["oneOf"]
        assert {"type": "string", "minLength": 1} in shapes
        assert {"$ref": "#/components/schemas/RerankDocument"} in shapes
    assert {"text", "image", "image_url", "image_b64"} == set(schemas["RerankDocument"]["properties"])
    assert {"id", "model", "results", "meta"} <= set(schemas["RerankResponse"]["properties"])
