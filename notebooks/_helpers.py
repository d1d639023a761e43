"""Loading and plotting helpers shared by the notebooks in this folder (not part of the package).

Everything read from a run goes through its verified ``_MANIFEST.json`` (:func:`load_run` resolves a root's
published ``LATEST`` or a run directory and checks every listed file): files the manifest does not list
(``_pairs/``, ``metrics.json``, anything written after publishing) are never read. All I/O goes through
:class:`operators.storage.Storage`, so ``s3://`` roots work with the usual AWS environment. Nothing here
writes anywhere.

Candidate images are fetched from the corpus by the ``(doc_shard, doc_row)`` recorded at embedding time:
``doc_shard`` is the embedding-cache key of a corpus shard, whose ``_SUCCESS.json`` names the source
file; only the row group holding the row is read, and the row's ``doc_id`` must match. If it does not
(the corpus changed after the run), the doc is looked up by ``doc_id`` in the run's configured corpus.
"""

from __future__ import annotations

import bisect
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from operators import layout as L
from operators.contracts import ALLOWED_FORMATS, DEFAULT_MAX_IMAGE_PIXELS
from operators.layout import root_of as root_of
from operators.runs import read_run_json, resolve_run, run_config, run_files
from operators.shards import list_shards
from operators.storage import Storage, scheme_of, strip_scheme
from pipelines.evaluate import load_qrels

CANDIDATE_COLUMNS = ("query_id", "rank", "doc_id", "retrieval_score", "doc_shard", "doc_row")
SCORED_COLUMNS = ("query_id", "doc_id", "retrieval_rank", "retrieval_score", "rerank_score", "doc_shard",
                  "doc_row")
RESULT_COLUMNS = ("query_id", "rank", "doc_id", "retrieval_score", "rerank_score", "final_score", "reranker",
                  "run_id")
REJECT_COLUMNS = ("stage", "source", "row_index", "id", "error_type", "error_message")

THUMBNAIL_PX = 192


# --- the run ------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A published (or explicitly named) run whose manifest verified."""

    root: str
    run_dir: str
    run_id: str
    manifest: dict[str, Any]
    config: dict[str, Any]
    storage: Storage = field(repr=False)

    def files(self, prefix: str, suffix: str = ".parquet") -> list[str]:
        """URIs of the manifest's files under ``prefix`` (sorted)."""
        return run_files(self.run_dir, self.manifest, prefix, suffix)

    def read_json(self, rel: str) -> Any:
        """A JSON file of the run, only if the manifest lists it."""
        return read_run_json(self.storage, self.run_dir, self.manifest, rel)

    def table(self, prefix: str, columns: Sequence[str]) -> pd.DataFrame:
        """The manifest's Parquet files under ``prefix`` as one DataFrame with ``columns`` (missing -> NA)."""
        frames = []
        for uri in self.files(prefix):
            df = self.storage.read_table(uri).to_pandas()
            for c in columns:
                if c not in df.columns:
                    df[c] = pd.NA
            frames.append(df[list(columns)])
        if not frames:
            return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})
        return pd.concat(frames, ignore_index=True)

    def candidates(self) -> pd.DataFrame:
        return self.table(L.prefix(L.CANDIDATES), CANDIDATE_COLUMNS)

    def scored(self) -> pd.DataFrame:
        return self.table(L.prefix(L.SCORED), SCORED_COLUMNS)

    def results(self) -> pd.DataFrame:
        return self.table(L.prefix(L.RESULTS), RESULT_COLUMNS)

    def rejects(self) -> pd.DataFrame:
        return self.table(L.prefix(L.REJECTS), REJECT_COLUMNS)

    def qrels_uri(self, qrels: str | None = None) -> str | None:
        """``qrels`` if given, else the run config's ``qrels`` (``None`` if neither)."""
        return qrels or self.config.get("qrels")

    def queries(self) -> dict[str, str]:
        """query_id -> text from the run config's query shards ({} when they cannot be read)."""
        src = self.config.get("queries")
        if not src:
            return {}
        out: dict[str, str] = {}
        try:
            for uri in list_shards(src, self.storage):
                t = self.storage.read_table(uri, columns=["query_id", "text"])
                for q, text in zip(t.column("query_id").to_pylist(), t.column("text").to_pylist(), strict=True):
                    if q is not None and q not in out:
                        out[q] = text
        except Exception as e:  # noqa: BLE001 - the texts are a nicety; say why they are missing
            print(f"query texts unavailable ({type(e).__name__}: {e})")  # noqa: T201
        return out


def load_run(root: str, storage: Storage | None = None) -> Run:
    """The published run of ``root`` (its ``LATEST``), or the run directory ``root``; verified."""
    storage = storage or Storage()
    run_dir, manifest = resolve_run(root, storage)
    return Run(root_of(run_dir), run_dir, manifest["run_id"], manifest, run_config(storage, run_dir, manifest),
               storage)


def relevant_docs(qrels: str | None, storage: Storage | None = None) -> dict[str, dict[str, int]]:
    """query_id -> {doc_id: relevance > 0}; {} without qrels."""
    if not qrels:
        return {}
    return {q: {d: r for d, r in docs.items() if r > 0} for q, docs in load_qrels(qrels, storage).items()}


# --- per-query views ----------------------------------------------------------------------------------


def pick_query(cands: pd.DataFrame, query_id: str | None) -> str:
    """``query_id`` if the run has candidates for it, else (``None``) the first query id in the run."""
    ids = sorted(cands["query_id"].dropna().unique())
    if not ids:
        raise ValueError("the run has no candidates")
    if query_id is None:
        return str(ids[0])
    if query_id not in set(ids):
        raise ValueError(f"query {query_id!r} has no candidates in this run (it has e.g. {ids[:5]})")
    return query_id


def before_after(run: Run, query_id: str, cands: pd.DataFrame | None = None, scored: pd.DataFrame | None = None,
                 results: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(before, after)`` for one query.

    before: its candidates by retrieval rank, with ``rerank_score`` (NaN when the pair was not scored) and
    ``final_rank`` (NaN when not kept). after: its kept results by final rank, with ``retrieval_rank`` and the
    ``doc_shard`` / ``doc_row`` of the candidate (to fetch the image).
    """
    cands = run.candidates() if cands is None else cands
    scored = run.scored() if scored is None else scored
    results = run.results() if results is None else results
    c = cands[cands["query_id"] == query_id].sort_values(["rank", "doc_id"]).drop_duplicates("doc_id")
    s = scored[scored["query_id"] == query_id][["doc_id", "rerank_score"]].drop_duplicates("doc_id")
    r = results[results["query_id"] == query_id].sort_values(["rank", "doc_id"]).drop_duplicates("doc_id")
    before = c.merge(s, on="doc_id", how="left").merge(
        r[["doc_id", "rank"]].rename(columns={"rank": "final_rank"}), on="doc_id", how="left")
    after = r.merge(c[["doc_id", "rank", "doc_shard", "doc_row"]].rename(columns={"rank": "retrieval_rank"}),
                    on="doc_id", how="left")
    return before.reset_index(drop=True), after.reset_index(drop=True)


def kept_flags(scored: pd.DataFrame, results: pd.DataFrame) -> pd.Series:
    """For each scored pair: is it in the kept results?"""
    kept = set(zip(results["query_id"], results["doc_id"], strict=True))
    return pd.Series([(q, d) in kept for q, d in zip(scored["query_id"], scored["doc_id"], strict=True)],
                     index=scored.index, dtype=bool)


def rejects_summary(rejects: pd.DataFrame) -> pd.DataFrame:
    """Rejected rows per (stage, error_type), most frequent first, with one example id and message."""
    if rejects.empty:
        return pd.DataFrame(columns=["stage", "error_type", "rows", "example_id", "example_message"])
    g = rejects.fillna({"id": "<null>", "error_message": ""}).groupby(["stage", "error_type"], dropna=False)
    out = g.agg(rows=("error_type", "size"), example_id=("id", "first"),
                 example_message=("error_message", "first")).reset_index()
    out["example_message"] = out["example_message"].astype(str).str.slice(0, 100)
    return out.sort_values(["rows", "stage", "error_type"], ascending=[False, True, True], ignore_index=True)


# --- corpus images ------------------------------------------------------------------------------------


class CorpusImages:
    """Fetch candidate images from the corpus shards by ``(doc_shard, doc_row)`` (see the module docstring)."""

    def __init__(self, run: Run, thumbnail_px: int = THUMBNAIL_PX) -> None:
        self.run = run
        self.storage = run.storage
        self.thumbnail_px = thumbnail_px
        embed = run.config.get("embed", {})
        self.max_pixels = int(embed.get("max_image_pixels") or DEFAULT_MAX_IMAGE_PIXELS)
        self.max_bytes = embed.get("max_image_bytes")
        self.allowed = tuple(embed.get("allowed_formats") or ALLOWED_FORMATS)
        self._sources: dict[str, str | None] = {}
        self._by_id: dict[str, tuple[str, int]] | None = None

    def shard_source(self, doc_shard: str) -> str | None:
        """The corpus file a cache key was embedded from (its ``_SUCCESS.json`` ``source``)."""
        if doc_shard not in self._sources:
            pattern = L.shard_marker(L.any_model_cache_dir(self.run.root, "corpus"), doc_shard)
            fs = self.storage.fs(pattern)
            prefix = "" if scheme_of(pattern) == "file" else f"{scheme_of(pattern)}://"
            source = None
            for path in sorted(fs.glob(strip_scheme(pattern))):
                try:
                    source = self.storage.read_json(prefix + path).get("source")
                except FileNotFoundError:
                    continue
                if source:
                    break
            self._sources[doc_shard] = source
        return self._sources[doc_shard]

    def _rows(self, uri: str, rows: Iterable[int]) -> dict[int, dict[str, Any]]:
        """The requested rows of one Parquet file, reading only the row groups that hold them."""
        pf = self.storage.parquet_file(uri)
        names = pf.schema_arrow.names
        cols = [c for c in ("doc_id", "image", "image_uri", "text") if c in names]
        starts, n = [], 0
        for g in range(pf.metadata.num_row_groups):
            starts.append(n)
            n += pf.metadata.row_group(g).num_rows
        wanted: dict[int, list[int]] = {}
        for r in rows:
            if 0 <= r < n:
                g = bisect.bisect_right(starts, r) - 1
                wanted.setdefault(g, []).append(r)
        out: dict[int, dict[str, Any]] = {}
        for g, rs in wanted.items():
            t = pf.read_row_group(g, columns=cols)
            for r in rs:
                out[r] = {c: t.column(c)[r - starts[g]].as_py() for c in cols}
        return out

    def _index_by_id(self) -> dict[str, tuple[str, int]]:
        """doc_id -> (shard uri, row) over the configured corpus; the first occurrence wins, as in the run."""
        if self._by_id is None:
            self._by_id = {}
            corpus = self.run.config.get("corpus")
            for uri in list_shards(corpus, self.storage) if corpus else []:
                ids = self.storage.read_table(uri, columns=["doc_id"]).column("doc_id").to_pylist()
                for i, d in enumerate(ids):
                    if d is not None and d not in self._by_id:
                        self._by_id[d] = (uri, i)
        return self._by_id

    def records(self, docs: pd.DataFrame) -> list[dict[str, Any] | str]:
        """Per row of ``docs`` (doc_id, doc_shard, doc_row): the corpus row as a dict, or why it is missing."""
        out: list[dict[str, Any] | str] = ["not found in the corpus"] * len(docs)
        by_source: dict[str, list[tuple[int, int]]] = {}
        keys = list(zip(docs["doc_id"], docs["doc_shard"], docs["doc_row"], strict=True))
        for i, (_, shard, row) in enumerate(keys):
            src = self.shard_source(shard) if isinstance(shard, str) else None
            if src is not None and row is not None and not pd.isna(row):
                by_source.setdefault(src, []).append((i, int(row)))
        for src, items in by_source.items():
            try:
                rows = self._rows(src, [r for _, r in items])
            except Exception as e:  # noqa: BLE001 - a missing shard costs its tiles, not the notebook
                for i, _ in items:
                    out[i] = f"cannot read {src}: {type(e).__name__}"
                continue
            for i, r in items:
                rec = rows.get(r)
                if rec is not None and rec.get("doc_id") == keys[i][0]:
                    out[i] = rec
        missing = [i for i, o in enumerate(out) if isinstance(o, str)]
        if missing:  # the corpus changed after the run (or the cache was pruned): look the ids up
            try:
                index = self._index_by_id()
            except Exception as e:  # noqa: BLE001
                index = {}
                print(f"corpus lookup by doc_id failed ({type(e).__name__}: {e})")  # noqa: T201
            for i in missing:
                hit = index.get(keys[i][0])
                if hit is not None:
                    rec = self._rows(hit[0], [hit[1]]).get(hit[1])
                    if rec is not None:
                        out[i] = rec
        return out

    def image(self, rec: dict[str, Any] | str) -> Any:
        """A PIL thumbnail for a corpus row, or the reason there is none (str)."""
        from operators.contracts import RejectError
        from operators.decode import decode_image

        if isinstance(rec, str):
            return rec
        data = rec.get("image")
        if data is None and rec.get("image_uri"):
            try:
                data = self.storage.read_bytes(rec["image_uri"])
            except Exception as e:  # noqa: BLE001
                return f"cannot read image_uri ({type(e).__name__})"
        try:
            img = decode_image(data, self.max_pixels, self.allowed, self.max_bytes)
        except RejectError as e:
            return f"{e.error_type}"
        img.thumbnail((self.thumbnail_px, self.thumbnail_px))
        return img

    def images(self, docs: pd.DataFrame) -> list[Any]:
        return [self.image(r) for r in self.records(docs)]


# --- plots --------------------------------------------------------------------------------------------


def show(fig: Any) -> None:
    """Display a figure as a PNG output and close it (works with any backend, including Agg)."""
    import matplotlib.pyplot as plt
    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    display(Image(data=buf.getvalue(), format="png"))


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None or pd.isna(x) else format(float(x), spec)


def tile_titles(df: pd.DataFrame, stage: str) -> list[str]:
    """``#rank doc_id`` / ``ret <score>  rr <score>`` / where the doc went (before) or came from (after)."""
    out = []
    for row in df.itertuples(index=False):
        if stage == "before":
            moved = f"kept #{int(row.final_rank)}" if not pd.isna(row.final_rank) else "not kept"
        else:
            moved = f"was #{int(row.retrieval_rank)}" if not pd.isna(row.retrieval_rank) else "not a candidate?"
        out.append(f"#{int(row.rank)} {row.doc_id}\nret {_fmt(row.retrieval_score)}  rr {_fmt(row.rerank_score)}"
                   f"\n{moved}")
    return out


def image_grid(images: Sequence[Any], titles: Sequence[str], suptitle: str, relevant: Sequence[bool] = (),
               ncols: int = 5) -> Any:
    """A grid of thumbnails (a str is drawn as a placeholder); relevant tiles get a green frame."""
    import matplotlib.pyplot as plt

    n = max(len(images), 1)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 3.3 * nrows), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
    for i, (img, title) in enumerate(zip(images, titles, strict=True)):
        ax = axes.flat[i]
        if isinstance(img, str):
            ax.text(0.5, 0.5, f"no image:\n{img}", ha="center", va="center", fontsize=8, wrap=True)
            ax.set_facecolor("#eeeeee")
        else:
            ax.imshow(img)
        rel = i < len(relevant) and relevant[i]
        ax.set_title(title + ("  [relevant]" if rel else ""), fontsize=7.5, color="darkgreen" if rel else "black")
        for s in ax.spines.values():
            s.set_visible(True)
            s.set_color("green" if rel else "lightgray")
            s.set_linewidth(3 if rel else 1)
    if not images:
        axes.flat[0].text(0.5, 0.5, "no rows", ha="center", va="center")
    fig.suptitle(suptitle, fontsize=10)
    return fig


def score_histograms(scored: pd.DataFrame, kept: pd.Series, bins: int = 30) -> Any:
    """Retrieval and rerank score distributions of every scored pair, kept vs not kept, and their scatter."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    groups = (("kept", kept, "tab:green"), ("not kept", ~kept, "tab:gray"))
    for ax, col in zip(axes[:2], ("retrieval_score", "rerank_score"), strict=True):
        vals = scored[col].astype(float)
        finite = vals.dropna()
        edges = bins if finite.empty or finite.min() == finite.max() else \
            [finite.min() + (finite.max() - finite.min()) * i / bins for i in range(bins + 1)]
        for label, mask, color in groups:
            v = vals[mask].dropna()
            if len(v):
                ax.hist(v, bins=edges, alpha=0.6, label=f"{label} ({len(v)})", color=color)
        ax.set_title(col.replace("_", " "))
        ax.set_xlabel("score")
        ax.set_ylabel("pairs")
        ax.legend(fontsize=8)
    ax = axes[2]
    for label, mask, color in groups:
        sub = scored[mask]
        ax.scatter(sub["retrieval_score"].astype(float), sub["rerank_score"].astype(float), s=10, alpha=0.6,
                   label=label, color=color)
    ax.set_xlabel("retrieval score")
    ax.set_ylabel("rerank score")
    ax.set_title("every scored pair")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def rejects_bar(summary: pd.DataFrame) -> Any:
    """Horizontal bars: rejected rows per ``stage / error_type``."""
    import matplotlib.pyplot as plt

    labels = [f"{s} / {e}" for s, e in zip(summary["stage"], summary["error_type"], strict=True)][::-1]
    counts = list(summary["rows"])[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.4 * max(len(labels), 1) + 1.2))
    if labels:
        ax.barh(labels, counts, color="tab:red")
        for y, c in enumerate(counts):
            ax.text(c, y, f" {c}", va="center", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no rejects", ha="center", va="center", transform=ax.transAxes)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("rejected rows")
    ax.set_title("rejects by stage / reason")
    fig.tight_layout()
    return fig


# --- evaluation ---------------------------------------------------------------------------------------


def metric_names(per_query: pd.DataFrame) -> list[str]:
    """The metrics of a ``pipelines.evaluate.per_query`` frame, in its column order."""
    return [c[: -len("_retrieval")] for c in per_query.columns if c.endswith("_retrieval")]


def metric_summary(per_query: pd.DataFrame) -> pd.DataFrame:
    """Mean over the judged queries per metric: retrieval, rerank, delta (= ``evaluate()``'s numbers)."""
    rows = []
    for m in metric_names(per_query):
        a, b = float(per_query[f"{m}_retrieval"].mean()), float(per_query[f"{m}_rerank"].mean())
        rows.append({"metric": m, "retrieval": a, "rerank": b, "delta": b - a})
    return pd.DataFrame(rows).set_index("metric")


def metrics_bar(summary: pd.DataFrame, title: str = "") -> Any:
    """Grouped bars: retrieval vs rerank per metric."""
    import matplotlib.pyplot as plt

    x = range(len(summary))
    w = 0.38
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(summary) + 2), 3.8))
    ax.bar([i - w / 2 for i in x], summary["retrieval"], w, label="retrieval", color="tab:blue")
    ax.bar([i + w / 2 for i in x], summary["rerank"], w, label="rerank", color="tab:orange")
    ax.set_xticks(list(x))
    ax.set_xticklabels(summary.index, rotation=30, ha="right")
    ax.set_ylim(0, max(1.0, float(summary[["retrieval", "rerank"]].max().max())) * 1.05)
    ax.set_ylabel("mean over judged queries")
    ax.set_title(title or "retrieval vs rerank")
    ax.legend()
    fig.tight_layout()
    return fig


def delta_bar(per_query: pd.DataFrame, metric: str) -> Any:
    """Per-query ``<metric>`` delta (rerank - retrieval), sorted; gains green, losses red."""
    import matplotlib.pyplot as plt

    d = per_query[["query_id", f"{metric}_delta"]].sort_values([f"{metric}_delta", "query_id"], ascending=[False, True])
    vals = d[f"{metric}_delta"].astype(float).tolist()
    colors = ["tab:green" if v > 0 else "tab:red" if v < 0 else "tab:gray" for v in vals]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(d) + 2), 3.8))
    ax.bar(range(len(d)), vals, color=colors)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.margins(y=0.08)
    if len(d) <= 40:
        ax.set_xticks(range(len(d)))
        ax.set_xticklabels(d["query_id"], rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(d)} queries, sorted")
    gains, losses = sum(v > 0 for v in vals), sum(v < 0 for v in vals)
    ax.set_ylabel(f"{metric} delta")
    ax.set_title(f"{metric}: rerank - retrieval per query ({gains} gains, {losses} losses, "
                 f"{len(vals) - gains - losses} ties)")
    fig.tight_layout()
    return fig


def gains_losses(per_query: pd.DataFrame, metric: str, n: int = 5,
                 queries: dict[str, str] | None = None) -> pd.DataFrame:
    """The ``n`` queries with the largest gain and the ``n`` with the largest loss on ``metric``."""
    col = f"{metric}_delta"
    keep = ["query_id", f"{metric}_retrieval", f"{metric}_rerank", col, "relevant", "kept"]
    d = per_query[[c for c in keep if c in per_query.columns]]
    gains = d[d[col] > 0].sort_values([col, "query_id"], ascending=[False, True]).head(n).assign(change="gain")
    losses = d[d[col] < 0].sort_values([col, "query_id"], ascending=[True, True]).head(n).assign(change="loss")
    out = pd.concat([gains, losses], ignore_index=True)
    if queries is not None:
        out.insert(1, "text", [queries.get(q, "") for q in out["query_id"]])
    return out
