"""The ``mmrerank`` command line: ``main(argv)`` is the console script and is callable from tests."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

import yaml

from operators.contracts import SchemaError
from operators.faiss_shards import IndexConfigError, IndexIntegrityError
from operators.models import ModelLoadError
from operators.runs import PublishError
from operators.shards import InputError
from operators.storage import StorageError, StorageOptions, redact, storage_error_of
from operators.watchdog import TERMINATE_REQUESTED, StallError, Terminated
from pipelines.config import Config, ConfigError, load_config

log = logging.getLogger("mmrerank")

# Errors a user can fix: reported in one line (exit 2), never with a traceback.
USER_ERRORS = (ConfigError, SchemaError, InputError, StorageError, ModelLoadError, IndexConfigError,
               IndexIntegrityError, PublishError, FileNotFoundError, ValueError)


# Credentials in forms `redact` cannot know by value (an instance profile's or IRSA's are not in the
# environment): botocore's DEBUG request dumps carry the key id in `Authorization: ... Credential=<id>/...`
# and the session token in an `X-Amz-Security-Token` header.
_CREDENTIAL_PATTERNS = (
    (re.compile(r"(Credential=)[^/\s,'\"&]+"), r"\1***"),
    (re.compile(r"(Signature=)[0-9a-fA-F]{16,}"), r"\1***"),
    (re.compile(r"""((?i:x-amz-security-token)['"]?\s*[:=]\s*b?['"]?)[^'"\s,&}]+"""), r"\1***"),
)


class _Redact(logging.Filter):
    """Scrubs credentials from every record the CLI's handler writes, third-party ones included."""

    def __init__(self) -> None:
        super().__init__()
        self.options: StorageOptions | None = None  # the loaded config's (its explicit credentials)

    def scrub(self, text: str) -> str:
        text = redact(text, self.options)
        for pattern, repl in _CREDENTIAL_PATTERNS:
            text = pattern.sub(repl, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = self.scrub(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)
        return True


_REDACT = _Redact()


def _load(args: argparse.Namespace) -> Config:
    """The command's config; its explicit credentials are scrubbed from the CLI's output from now on."""
    cfg = load_config(args.config, args.set)  # --set items, parsed by config.parse_override
    _REDACT.options = cfg.storage.options()
    return cfg


def _setup_logging(verbose: int) -> None:
    """Log to stderr unless the caller (a notebook, pytest) already configured logging."""
    level = logging.DEBUG if verbose > 1 else logging.INFO
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(_REDACT)
        if verbose < 2:
            # open_clip logs its chatter through the root logger itself: drop that below WARNING.
            handler.addFilter(lambda r: r.name != "root" or r.levelno >= logging.WARNING)
        root.addHandler(handler)
        root.setLevel(level)
    for ours in ("mmrerank", "operators", "pipelines"):
        logging.getLogger(ours).setLevel(level)
    from pipelines.ray_env import set_quiet_console

    # Without -v: a progress line per stage and the summaries; Ray's, faiss' and the loaders' chatter
    # stays in Ray's session log files.
    set_quiet_console(verbose == 0)
    if verbose == 0:  # transformers' and huggingface_hub's tqdm bars (saving/loading weights)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for noisy in ("faiss", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose == 0 else logging.INFO)
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.DEBUG)


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    sys.stdout.write(yaml.safe_dump(cfg.redacted_dump(), sort_keys=False))
    return 0


def cmd_make_sample(args: argparse.Namespace) -> int:
    from pipelines.sample import make_sample

    info = make_sample(args.out, docs=args.docs, queries=args.queries, shards=args.shards, seed=args.seed,
                       bad_rows=args.bad_rows, image_size=args.image_size, image_uri=args.image_uri,
                       binding=args.binding)
    log.info("sample written: corpus=%s queries=%s qrels=%s (%d docs, %d queries, %d bad rows)",
             info.corpus, info.queries, info.qrels, info.docs, info.queries_n, len(info.bad_rows))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from pipelines.embed import run_embed, summary_lines

    cfg = _load(args)
    kinds = tuple(args.only) if args.only else ("corpus", "queries")
    results = run_embed(cfg, kinds, force=args.force)
    for line in summary_lines(results):
        log.info("%s", line)
    for r in results:
        log.info("%s embeddings: %s (set %s)", r.kind, r.cache, r.set_uri)
    if args.json:
        sys.stdout.write(json.dumps([r.to_json() for r in results], indent=2) + "\n")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from pipelines.index import build_index

    cfg = _load(args)
    r = build_index(cfg)
    m = r.manifest
    log.info("index %s: %s, dim %d, %d vectors in %d shards (%s)%s", r.uri, m["factory"], m["dim"], r.ntotal,
             len(m["shards"]), "/".join(str(s["ntotal"]) for s in m["shards"]), " (reused)" if r.reused else "")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from pipelines.search import run_search

    cfg = _load(args)
    r = run_search(cfg, run_id=args.run_id)
    if args.json:
        sys.stdout.write(json.dumps(r.to_json(), indent=2) + "\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.run import run

    cfg = _load(args)
    report = run(cfg, resume=args.resume, run_id=args.run_id, publish=not args.no_publish)
    for line in report.table():
        log.info("%s", line)
    return 0


def cmd_rerank(args: argparse.Namespace) -> int:
    from pipelines.rerank import run_rerank

    cfg = _load(args)
    run_rerank(cfg, args.run_id)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipelines.evaluate import evaluate, format_table

    metrics = evaluate(args.run, args.qrels, k=args.k)
    sys.stdout.write("\n".join(format_table(metrics)) + "\n")
    return 0


def cmd_export_trec(args: argparse.Namespace) -> int:
    from pipelines.evaluate import export_trec

    for uri in export_trec(args.run, out=args.out):
        sys.stdout.write(uri + "\n")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pipelines.config import RayConfig
    from pipelines.ray_env import ensure_ray
    from pipelines.serve import ServeSettings, start

    settings = ServeSettings(root=args.root, host=args.host, port=args.port, reload_interval_s=args.reload_interval,
                             ingress=args.ingress)
    ensure_ray(RayConfig(address=args.address))  # the one place that starts/joins Ray (same rules as the jobs)
    start(settings, blocking=True)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.train import run_train

    cfg = _load(args)
    for line in run_train(cfg).lines():
        log.info("%s", line)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from pipelines.quickstart import TRAINED_DOCS, TRAINED_QUERIES, quickstart

    trained = not args.random_weights
    docs = args.docs if args.docs is not None else (TRAINED_DOCS if trained else 200)
    queries = args.queries if args.queries is not None else (TRAINED_QUERIES if trained else 20)
    quickstart(args.out, docs=docs, queries=queries, shards=args.shards, trained=trained)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmrerank", description=__doc__)
    p.add_argument("-v", "--verbose", action="count", default=0)
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="validate a config file and print it resolved (no secrets)")
    v.add_argument("config")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    v.set_defaults(fn=cmd_validate)

    s = sub.add_parser("make-sample", help="write a deterministic synthetic corpus, queries and qrels")
    s.add_argument("--out", required=True, help="output URI (local path or s3://)")
    s.add_argument("--docs", type=int, default=200)
    s.add_argument("--queries", type=int, default=20)
    s.add_argument("--shards", type=int, default=4)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--image-uri", action="store_true", help="store images as files and reference them by URI")
    s.add_argument("--bad-rows", action="store_true", help="add the documented mix of broken rows")
    s.add_argument("--binding", action="store_true",
                   help="attribute-binding docs and queries (groups of 4 docs per concept; what `train` uses)")
    s.set_defaults(fn=cmd_make_sample)

    e = sub.add_parser("embed", help="embed corpus images and query texts into the embeddings cache")
    e.add_argument("config")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    e.add_argument("--only", action="append", choices=["corpus", "queries"], help="embed only this input")
    e.add_argument("--force", action="store_true", help="ignore the cache and re-embed every shard")
    e.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    e.set_defaults(fn=cmd_embed)
    i = sub.add_parser("index", help="build (or reuse) the sharded FAISS index from the corpus embeddings")
    i.add_argument("config")
    i.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    i.set_defaults(fn=cmd_index)

    r = sub.add_parser("search", help="top-k candidates for every query from the sharded index")
    r.add_argument("config")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    r.add_argument("--run-id", default=None, help="write under <root>/runs/RUN_ID (default: a new id)")
    r.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    r.set_defaults(fn=cmd_search)

    rr = sub.add_parser("rerank", help="rerank the candidates of a run (after `search`)")
    rr.add_argument("config")
    rr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    rr.add_argument("--run-id", required=True)
    rr.set_defaults(fn=cmd_rerank)

    n = sub.add_parser("run", help="the nightly job: embed, index, search, rerank, publish (resumable)")
    n.add_argument("config")
    n.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    n.add_argument("--resume", default=None, metavar="RUN_ID", help="finish this unfinished run")
    n.add_argument("--run-id", default=None, help="id for a new run (default: timestamp + random)")
    n.add_argument("--no-publish", action="store_true", help="write the run but leave LATEST alone")
    n.set_defaults(fn=cmd_run)

    ev = sub.add_parser("eval", help="retrieval vs rerank metrics of a run against qrels; writes metrics.json")
    ev.add_argument("--run", required=True, help="a run directory URI, or a root URI (its published LATEST run)")
    ev.add_argument("--qrels", required=True, help="qrels: Parquet (query_id, doc_id, relevance) or TREC text")
    ev.add_argument("--k", type=int, default=None, help="cutoff for Recall@k (default: the run's search k)")
    ev.set_defaults(fn=cmd_eval)

    xt = sub.add_parser("export-trec", help="write TREC run files (retrieval.run, rerank.run) for a run")
    xt.add_argument("--run", required=True, help="a run directory URI, or a root URI (its published LATEST run)")
    xt.add_argument("--out", default=None, help="output directory URI (default: <run_dir>/trec)")
    xt.set_defaults(fn=cmd_export_trec)

    sv = sub.add_parser("serve", help="serve the published run over HTTP (Ray Serve), live search + rerank")
    sv.add_argument("--root", required=True, help="output root whose LATEST run is served")
    sv.add_argument("--host", default="127.0.0.1", help="listen address (loopback unless told otherwise)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--reload-interval", type=float, default=10.0, help="seconds between LATEST polls")
    sv.add_argument("--ingress", choices=["direct", "proxy"], default="direct",
                    help="direct: the app's ingress replica listens on --port (one hop, fastest on one host); "
                         "proxy: Serve's HTTP proxy does (several ingress replicas, multi-node)")
    sv.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    sv.set_defaults(fn=cmd_serve)

    t = sub.add_parser("train", help="fine-tune the retriever (clip) or the reranker (vlm_yesno) with Ray Train")
    t.add_argument("config")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    t.set_defaults(fn=cmd_train)

    q = sub.add_parser("quickstart", help="make a sample and run the pipeline on the embedded default")
    q.add_argument("--out", default="mmrerank-quickstart", help="where the sample and outputs go")
    q.add_argument("--docs", type=int, default=None, help="default 640 (trained) / 200 (--random-weights)")
    q.add_argument("--queries", type=int, default=None, help="default 160 (trained) / 20 (--random-weights)")
    q.add_argument("--shards", type=int, default=4)
    q.add_argument("--random-weights", action="store_true",
                   help="skip training: the default sample on random-weight models (a smoke test)")
    q.set_defaults(fn=cmd_quickstart)
    return p


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not break the clean-up it starts
    TERMINATE_REQUESTED.set()
    raise Terminated(signum)


@contextmanager
def _sigterm_stops_cleanly() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` on the main thread for the command's duration, then restore."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed on the main thread (main() called from a thread)
        return
    TERMINATE_REQUESTED.clear()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        TERMINATE_REQUESTED.clear()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        with _sigterm_stops_cleanly():
            return int(args.fn(args))
    except USER_ERRORS as e:
        # A storage failure raised in a Ray worker arrives wrapped, its str a remote traceback: report
        # the worker's own one-line message.
        inner = storage_error_of(e)
        msg = str(e) if inner is None else str(inner).strip().splitlines()[0]
        log.error("%s", _REDACT.scrub(msg))
        return 2
    except StallError as e:
        log.error("%s", _REDACT.scrub(str(e)))
        return 3
    except (Terminated, KeyboardInterrupt) as e:
        terminated = isinstance(e, Terminated)
        # An unfinished run keeps its finished stages and never moved LATEST: the same command resumes it.
        log.error("stopped by %s%s", "SIGTERM" if terminated else "an interrupt",
                  "; nothing was published, the same command resumes the run" if args.command == "run" else "")
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
