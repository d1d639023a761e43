"""Screenshot of the results explorer (``GET /`` of ``mmrerank serve``) for the README: ``benchmarks/explorer.png``.

    python benchmarks/explorer_screenshot.py                          # quickstart run in a tmp dir, serve it, shoot
    python benchmarks/explorer_screenshot.py --url http://127.0.0.1:8000 --query q-00003   # an app already running

Headless Debian chromium through selenium (``tests/browser.py``), a laptop-sized window; the page is shot
once the view has rendered and every thumbnail has loaded, then stored as an optimised palette PNG.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_serve import _free_port, _wait_ok  # noqa: E402
from tests.browser import chromium  # noqa: E402

READY = ("const b = document.body.dataset; return b.state === 'ready' && b.view === location.search "
         "&& [...document.images].every(i => i.complete)")


def shoot(url: str, query: str, out: Path, width: int, height: int, colors: int) -> int:
    from PIL import Image
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium(width, height) as d:
        d.get(f"{url}/?{urllib.parse.urlencode({'q': query})}")
        WebDriverWait(d, 120, poll_frequency=0.2).until(lambda d: d.execute_script(READY))
        png = d.get_screenshot_as_png()
    img = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, format="PNG", optimize=True)
    return out.stat().st_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--url", help="an app already running (default: a quickstart run served here)")
    ap.add_argument("--query", help="query id to show (default: the run's query with the most relevant docs kept)")
    ap.add_argument("--docs", type=int, default=60)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "explorer.png")
    ap.add_argument("--width", type=int, default=1366)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--colors", type=int, default=96, help="palette size of the stored PNG")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    url = args.url
    if url is None:
        import logging

        import ray

        from pipelines.quickstart import quickstart, quickstart_config
        from pipelines.serve import ServeSettings, start

        logging.basicConfig(level=logging.WARNING)
        work = tempfile.mkdtemp(prefix="explorer-shot-")
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
        rep = quickstart(work, docs=args.docs, queries=args.queries, shards=2)
        print(f"quickstart: run {rep.run_id} under {work}", flush=True)
        settings = ServeSettings(root=quickstart_config(work).root, port=_free_port(), device="cpu")
        start(settings)
        url = f"http://{settings.host}:{settings.port}"
    _wait_ok(url)
    query = args.query
    if query is None:
        import httpx

        with httpx.Client(base_url=url, timeout=60) as c:
            ids = c.get("/v1/explore/queries", params={"limit": 50}).json()["query_ids"]

            def kept_relevant(q: str) -> int:
                v = c.get(f"/v1/explore/queries/{urllib.parse.quote(q, safe='')}").json()
                rel = v.get("relevance") or {}
                return sum(1 for r in v["reranked"] if rel.get(r["doc_id"], 0) > 0)

            query = max(ids, key=kept_relevant)
    t = time.perf_counter()
    size = shoot(url, query, args.out, args.width, args.height, args.colors)
    print(f"{args.out}: query {query}, {size / 1024:.0f} KiB, {time.perf_counter() - t:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
