"""The results explorer: a web page served by ``mmrerank serve`` over the published run (issue 18).

``GET /`` is ``index.html`` with its script and stylesheet under ``/static/`` (plain files shipped in this
package: no CDN, no build step). The page talks only to the app's JSON endpoints:

* ``GET /v1/explore/run``: run facts for the header (run id, created, reranker, fusion, selection, counts).
* ``GET /v1/explore/queries?prefix=``: query id suggestions; ``GET /v1/explore/queries/{query_id}``: one
  precomputed query, retrieval's top-k beside the kept list, with the query's metrics when the run has qrels.
* ``POST /v1/explore/like``: "more like this", the doc's own embedding through live search.
* ``GET /v1/docs/{doc_id}``, ``POST /v1/docs`` (several), ``GET /v1/docs/{doc_id}/thumbnail?size=``.
* free text goes through ``POST /v1/search`` as any client's would.

:mod:`.views` holds what the ingress replica computes, :mod:`.docs` what the model replica does with the
index and the corpus (doc lookup, thumbnails, a doc's embedding).
"""

from __future__ import annotations

from importlib.resources import files

# The page runs only its own script and style; images and fetches go to this origin only.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# A thumbnail opened on its own: nothing in it may run or load.
IMAGE_CSP = "default-src 'none'; sandbox"
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "X-Frame-Options": "DENY"}

_ASSETS = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
           "style.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}


def asset(name: str) -> tuple[bytes, str] | None:
    """(bytes, content type) of one shipped asset; None for any other name (no path ever reaches the disk)."""
    ctype = _ASSETS.get(name)
    if ctype is None:
        return None
    return (files(__name__) / name).read_bytes(), ctype


def asset_headers(name: str) -> dict[str, str]:
    """Headers of a shipped asset: the page gets the strict CSP; no asset is cached stale after an upgrade."""
    h = {**SECURITY_HEADERS, "Cache-Control": "no-cache"}
    if name == "index.html":
        h["Content-Security-Policy"] = PAGE_CSP
    return h


def thumbnail_headers() -> dict[str, str]:
    """A thumbnail is ours (re-encoded JPEG), typed by us, never sniffed, cacheable by this browser only."""
    return {**SECURITY_HEADERS, "Content-Security-Policy": IMAGE_CSP, "Cache-Control": "private, max-age=3600"}
