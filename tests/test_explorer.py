"""The results explorer (``pipelines/explorer``) in a real headless chromium, over the real Serve app.

One module-scoped setup: a quickstart run (24 docs + the sample's bad rows, markup rows included, 4 queries,
2 shards), one local Ray, the Serve app on 127.0.0.1:<free port>, one headless Debian chromium (selenium,
``tests/browser.py``). Grids are read back from the DOM (``data-doc-id``, ``data-rank``, each score's exact
``data-value``) and compared with the API and the run's files:

* HTTP: the page and its assets (types, nosniff, the strict CSP), doc metadata, thumbnails (re-encoded JPEG
  within the size, cached, unknown id 404, bad size 422), the byte-bounded thumbnail cache.
* A query id typed in the box (keyboard only): retrieval grid = the run's candidates (order, scores), the
  kept grid = ``GET /v1/results`` (order, all three scores); relevant docs marked as the qrels say.
* Free text: both grids = ``POST /v1/search`` with ``rerank`` false / true.
* Markup in captions, ids and query text renders as text: no element is created from it, ``window.mmrXss``
  (what the sample's payloads would set) stays undefined.
* "More like this" from a card: URL state, the doc first in its own image query, the grids equal
  ``POST /v1/explore/like``; reload and back restore the views.
"""

from __future__ import annotations

import io
import os
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pytest

from tests.browser import available, chromium
from tests.helpers import QuickstartRun, cas_latest, serve_app

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

VIEW_DEADLINE_S = 60.0
READ_GRID = """
return [...document.querySelectorAll('#' + arguments[0] + ' > li.card')].map(li => ({
  id: li.dataset.docId, rank: Number(li.dataset.rank), rel: li.classList.contains('relevant'),
  caption: li.querySelector('.caption').textContent,
  kept: li.querySelector('.badge.kept') ? li.querySelector('.badge.kept').textContent : null,
  s: Object.fromEntries([...li.querySelectorAll('[data-score]')].map(d => [d.dataset.score, d.dataset.value]))}));
"""


@dataclass
class App:
    base: str
    client: Any
    browser: Any
    root: str  # the published root
    run_dir: str
    sample: Any  # SampleInfo
    corpus: dict[str, dict[str, Any]]  # doc_id -> corpus row (valid ids only)

    def open(self, query: str = "") -> None:
        self.browser.get(self.base + "/" + query)
        self.wait_view()

    def wait_view(self) -> str:
        """Wait until the page finished rendering the view its URL names; returns its state."""
        from selenium.webdriver.support.ui import WebDriverWait

        js = ("const b = document.body.dataset; return (b.state === 'ready' || b.state === 'error') "
              "&& b.view === location.search ? b.state : null")
        return WebDriverWait(self.browser, VIEW_DEADLINE_S, poll_frequency=0.1).until(lambda d: d.execute_script(js))

    def grid(self, name: str) -> list[dict[str, Any]]:
        return self.browser.execute_script(READ_GRID, name)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, quickstart_run: QuickstartRun, ray_serve: None) -> Iterator[App]:
    from pipelines.quickstart import quickstart_config
    from pipelines.sample import load_sample_info

    qs = quickstart_run.copy(tmp_path_factory.mktemp("explorer") / "qs")  # the root is this module's to change
    out = qs.out
    cfg = quickstart_config(str(out))
    with serve_app(cfg.root) as settings:
        base = f"http://{settings.host}:{settings.port}"
        client = httpx.Client(base_url=base, timeout=60.0)
        corpus: dict[str, dict[str, Any]] = {}
        for r in ds.dataset(cfg.corpus).to_table().to_pylist():
            if r["doc_id"] is not None:
                corpus.setdefault(r["doc_id"], r)  # the first occurrence wins (later ones are duplicate_id)
        try:
            with chromium() as browser:
                yield App(base=base, client=client, browser=browser, root=cfg.root, run_dir=qs.run_dir,
                          sample=load_sample_info(str(out / "sample")), corpus=corpus)
        finally:
            client.close()


def _markup(app: App, case: str) -> dict[str, Any]:
    return next(b for b in app.sample.bad_rows if b["case"] == case)


def _path_id(doc_id: str) -> str:
    return urllib.parse.quote(doc_id, safe="")


def _floats(values: list[Any]) -> list[float | None]:
    return [None if v in ("", None) else float(v) for v in values]


# --- HTTP -------------------------------------------------------------------------------------------------


def test_page_and_assets_are_typed_and_locked_down(app: App) -> None:
    from pipelines.explorer import PAGE_CSP

    r = app.client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == PAGE_CSP and "'unsafe-inline'" not in PAGE_CSP
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "<script src=\"/static/app.js\"" in r.text and "http" not in r.text.split("<body", 1)[1]
    for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css"), ("favicon.svg", "image/svg+xml")):
        r = app.client.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype), name
        assert r.headers["x-content-type-options"] == "nosniff"
    for bad in ("/static/nope.js", "/static/..%2F__init__.py", "/static/%2e%2e/serve.py"):
        assert app.client.get(bad).status_code == 404, bad
    assert "innerHTML" not in app.client.get("/static/app.js").text  # text nodes only


def test_doc_metadata_and_thumbnails(app: App) -> None:
    from PIL import Image

    doc_id = sorted(app.corpus)[0]
    r = app.client.get(f"/v1/docs/{doc_id}")
    assert r.status_code == 200, r.text
    meta = r.json()
    assert meta["caption"] == app.corpus[doc_id]["text"] and meta["doc_id"] == doc_id
    rows = ds.dataset(os.path.join(app.sample.corpus, meta["source"])).to_table(columns=["doc_id"]).column(0)
    assert rows[meta["row"]].as_py() == doc_id
    for size in (16, 48, 512):
        t = app.client.get(f"/v1/docs/{doc_id}/thumbnail", params={"size": size})
        assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
        assert t.headers["x-cache"] == "miss", size  # made now
        assert t.headers["x-content-type-options"] == "nosniff" and "sandbox" in t.headers["content-security-policy"]
        assert t.content != app.corpus[doc_id]["image"]  # re-encoded, never the stored bytes
        im = Image.open(io.BytesIO(t.content))
        stored = Image.open(io.BytesIO(app.corpus[doc_id]["image"]))
        assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) == min(size, max(stored.size))
        again = app.client.get(f"/v1/docs/{doc_id}/thumbnail", params={"size": size})
        assert again.headers["x-cache"] == "hit" and again.content == t.content, size  # from the cache
    assert app.client.get(f"/v1/docs/{doc_id}/thumbnail").status_code == 200  # default size
    for bad in ("0", "15", "513", "abc", "1e3"):
        r = app.client.get(f"/v1/docs/{doc_id}/thumbnail", params={"size": bad})
        assert r.status_code == 422 and "abc" not in r.text, bad
    rejected = next(b["doc_id"] for b in app.sample.expected_rejects if b["doc_id"] and b["error_type"] == "undecodable")
    for unknown in ("no-such-doc", rejected):
        assert app.client.get(f"/v1/docs/{_path_id(unknown)}").status_code == 404
        assert app.client.get(f"/v1/docs/{_path_id(unknown)}/thumbnail").status_code == 404
    # An id holding markup and slashes round-trips through the path.
    odd = _markup(app, "markup_id_img")["doc_id"]
    r = app.client.get(f"/v1/docs/{_path_id(odd)}")
    assert r.status_code == 200 and r.json()["doc_id"] == odd
    assert app.client.get(f"/v1/docs/{_path_id(odd)}/thumbnail").headers["content-type"] == "image/jpeg"
    got = app.client.post("/v1/docs", json={"doc_ids": [doc_id, "no-such-doc", odd]}).json()["docs"]
    assert [d["doc_id"] for d in got] == [doc_id, odd]
    assert app.client.post("/v1/docs", json={"doc_ids": []}).status_code == 422


def test_thumbnail_cache_is_bounded_lru() -> None:
    from pipelines.explorer.views import ByteLRU

    c = ByteLRU(100)
    for i in range(5):
        c.put(i, bytes(30))
    assert c.bytes <= 100 and len(c) == 3 and c.get(0) is None and c.get(4) is not None
    c.get(2)  # 2 becomes the most recent: 3 goes next
    c.put(9, bytes(30))
    assert c.get(3) is None and c.get(2) is not None
    c.put("big", bytes(101))  # larger than the whole cache: not kept, nothing evicted
    assert c.get("big") is None and len(c) == 3


# --- in the browser ---------------------------------------------------------------------------------------


def _run_rows(app: App, part: str, qid: str) -> list[dict[str, Any]]:
    t = ds.dataset(os.path.join(app.run_dir, part)).to_table(filter=ds.field("query_id") == qid)
    return t.to_pylist()


def _f32(x: float) -> float:
    return float(np.float32(x))


def test_query_id_lookup_matches_the_run(app: App) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from pipelines.evaluate import load_qrels

    app.open()
    assert app.browser.find_element(By.ID, "facts").text.count(app.run_dir.rsplit("/", 1)[-1]) == 1
    qid = sorted(app.client.get("/v1/explore/queries", params={"prefix": ""}).json()["query_ids"])[1]
    box = app.browser.find_element(By.ID, "qid")
    box.send_keys(qid, Keys.ENTER)  # the keyboard alone
    assert app.wait_view() == "ready"
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(app.browser.current_url).query) == {"q": [qid]}

    want_kept = app.client.get(f"/v1/results/{qid}").json()["results"]
    kept = app.grid("reranked")
    assert [c["id"] for c in kept] == [r["doc_id"] for r in want_kept]
    assert [c["rank"] for c in kept] == [r["rank"] for r in want_kept]
    for key in ("retrieval_score", "rerank_score", "final_score"):
        assert _floats([c["s"][key] for c in kept]) == [r[key] for r in want_kept], key

    cand = sorted(_run_rows(app, "candidates", qid), key=lambda r: r["rank"])
    scored = {r["doc_id"]: r for r in _run_rows(app, "scored", qid)}
    ret = app.grid("retrieval")
    assert [c["id"] for c in ret] == [r["doc_id"] for r in cand] and len(ret) == len(cand) > len(kept)
    assert _floats([c["s"]["retrieval_score"] for c in ret]) == [_f32(r["retrieval_score"]) for r in cand]
    assert _floats([c["s"]["rerank_score"] for c in ret]) == [_f32(scored[r["doc_id"]]["rerank_score"]) for r in cand]
    kept_rank = {r["doc_id"]: r["rank"] for r in want_kept}
    assert [c["kept"] for c in ret] == [f"kept #{kept_rank[c['id']]}" if c["id"] in kept_rank else None for c in ret]
    captions = {c["id"]: c["caption"] for c in ret + kept}
    assert all(captions[d] == app.corpus[d]["text"] for d in captions)

    relevant = {d for d, g in load_qrels(app.sample.qrels).get(qid, {}).items() if g > 0}
    assert {c["id"] for c in ret + kept if c["rel"]} == relevant & set(captions)
    assert app.browser.find_element(By.ID, "metrics").text.startswith("This query's metrics")

    app.open("?q=no-such-query")
    assert app.wait_view() == "error" and "404" in app.browser.find_element(By.ID, "status").text


def test_free_text_search_matches_the_api(app: App) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    qid = app.client.get("/v1/explore/queries").json()["query_ids"][0]
    text = app.client.get(f"/v1/explore/queries/{qid}").json()["text"] + " please"
    app.open()
    app.browser.find_element(By.ID, "text").send_keys(text, Keys.ENTER)
    assert app.wait_view() == "ready"
    k = app.client.get("/v1/explore/run").json()["search_k"]
    want_ret = app.client.post("/v1/search", json={"text": text, "top_k": k, "rerank": False}).json()["results"]
    want_rr = app.client.post("/v1/search", json={"text": text, "top_k": k, "rerank": True}).json()["results"]
    ret, rr = app.grid("retrieval"), app.grid("reranked")
    assert [c["id"] for c in ret] == [r["doc_id"] for r in want_ret] and len(ret) == k
    # The page's two searches run concurrently (one embedding batch of 2): equal to float32 rounding.
    assert _floats([c["s"]["retrieval_score"] for c in ret]) == pytest.approx([r["retrieval_score"] for r in want_ret],
                                                                               abs=1e-6)
    assert [(c["id"], c["rank"]) for c in rr] == [(r["doc_id"], r["rank"]) for r in want_rr]
    for key in ("retrieval_score", "rerank_score", "final_score"):
        assert _floats([c["s"][key] for c in rr]) == pytest.approx([r[key] for r in want_rr], abs=1e-6), key
    assert sum(c["kept"] is not None for c in ret) == len({r["doc_id"] for r in want_rr} & {c["id"] for c in ret})


def _inert(app: App) -> None:
    """Nothing the untrusted text holds became an element or ran."""
    from pipelines.sample import XSS_FLAG

    b = app.browser
    assert b.execute_script(f"return typeof window.{XSS_FLAG}") == "undefined"
    assert b.execute_script("return document.querySelectorAll('body script').length") == 0
    imgs = b.execute_script("return [...document.querySelectorAll('body img')].map(i => i.getAttribute('src'))")
    assert all(src.startswith("/v1/docs/") and src.endswith("/thumbnail?size=128") for src in imgs)
    assert not [m for m in b.get_log("browser") if "Content Security Policy" in m["message"]]


def test_markup_renders_as_text_and_more_like_this(app: App) -> None:
    from selenium.webdriver.common.by import By

    for case in ("markup_caption_script", "markup_id_img"):
        doc_id = _markup(app, case)["doc_id"]
        app.open("?" + urllib.parse.urlencode({"like": doc_id}))
        assert app.wait_view() == "ready"
        ret = app.grid("retrieval")
        assert ret[0]["id"] == doc_id  # its own embedding: itself first
        assert ret[0]["caption"] == app.corpus[doc_id]["text"] and "<" in ret[0]["caption"]
        assert doc_id in app.browser.find_element(By.ID, "query").text
        want = app.client.post("/v1/explore/like", json={"doc_id": doc_id, "top_k": len(ret)}).json()
        assert [c["id"] for c in ret] == [r["doc_id"] for r in want["retrieval"]]
        assert [c["id"] for c in app.grid("reranked")] == [r["doc_id"] for r in want["reranked"]]
        _inert(app)

    hostile = '<img src=x onerror="window.mmrXss=2"><script>window.mmrXss=3</script>'
    app.open("?" + urllib.parse.urlencode({"text": hostile}))
    assert app.wait_view() == "ready"
    assert hostile in app.browser.find_element(By.ID, "query").text
    _inert(app)

    # "More like this" on the second kept card, then reload and back.
    qid = app.client.get("/v1/explore/queries").json()["query_ids"][0]
    app.open("?" + urllib.parse.urlencode({"q": qid}))
    target = app.grid("reranked")[1]["id"]
    app.browser.find_elements(By.CSS_SELECTOR, "#reranked > li.card button.like")[1].click()
    assert app.wait_view() == "ready"
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(app.browser.current_url).query) == {"like": [target]}
    before = (app.grid("retrieval"), app.grid("reranked"))
    assert before[0][0]["id"] == target
    want = app.client.post("/v1/explore/like", json={"doc_id": target, "top_k": len(before[0])}).json()
    assert _floats([c["s"]["retrieval_score"] for c in before[0]]) == [r["retrieval_score"] for r in want["retrieval"]]
    app.browser.refresh()
    assert app.wait_view() == "ready"
    assert (app.grid("retrieval"), app.grid("reranked")) == before
    app.browser.back()
    assert app.wait_view() == "ready"
    assert [c["id"] for c in app.grid("reranked")] == [r["doc_id"] for r in app.client.get(f"/v1/results/{qid}").json()["results"]]


def test_degraded_run_is_shown(app: App) -> None:
    """LATEST names a run without a manifest: the app keeps serving the old run, the page says degraded."""
    from selenium.webdriver.common.by import By

    good = app.client.get("/v1/runs/current").json()["run_id"]
    os.makedirs(os.path.join(app.root, "runs", "bad-explorer"), exist_ok=True)
    try:
        cas_latest(app.root, "bad-explorer")
        end = time.monotonic() + VIEW_DEADLINE_S
        while app.client.get("/healthz").json()["status"] != "degraded":
            assert time.monotonic() < end, "the app never reported the refused run"
            time.sleep(0.25)
        app.open()
        facts = app.browser.find_element(By.ID, "facts").text
        assert "degraded" in facts and "bad-explorer" in facts and good in facts
    finally:
        cas_latest(app.root, good)
