"""The documentation: README.md is a short landing page, docs/*.md hold the rest (no Ray, no model, fast).

* Every relative link of README.md and docs/*.md (``[text](path)``, ``![alt](path)``, ``path#anchor``,
  ``#anchor``) resolves to a file of this repository, and an anchor to a heading of that file by GitHub's
  slug rules. External ``http(s)://`` and ``mailto:`` links are not fetched.
* Every field of the config schema (``pipelines.config.Config`` and its nested models, recursively) is
  named in docs/configuration.md.
* README.md stays a landing page: at most 300 lines.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from urllib.parse import unquote

import pytest
from pydantic import BaseModel

from pipelines.config import Config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 300

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) or ![alt](target), with an optional "title"; the text may hold one level of brackets.
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^\s)>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_EXTERNAL = ("http://", "https://", "mailto:")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _prose_lines(text: str) -> list[str]:
    """The page's lines with fenced code blocks blanked (a link or a '#' line inside one is code)."""
    out, fence = [], None
    for line in text.splitlines():
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            out.append("")
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
            out.append("")
        else:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup and punctuation dropped (``-`` and ``_`` kept), lowercase,
    spaces -> ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a markdown page; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        m = _HEADING.match(line)
        if not m:
            continue
        s = slug(m.group(2))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(page: Path) -> list[str]:
    """The link targets of a page, outside code blocks and code spans."""
    prose = "\n".join(_CODE_SPAN.sub("", line) for line in _prose_lines(page.read_text(encoding="utf-8")))
    return _LINK.findall(prose)


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The page's relative links that do not resolve, each with why; [] when all do."""
    bad = []
    for target in links(page):
        if target.startswith(_EXTERNAL):
            continue
        if not target or _SCHEME.match(target) or target.startswith("/"):
            bad.append(f"{target!r}: not a relative link")
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path_part)).resolve() if path_part else page.resolve()
        if not dest.is_relative_to(root.resolve()):
            bad.append(f"{target!r}: outside the repository")
        elif not dest.exists():
            bad.append(f"{target!r}: no such file")
        elif anchor:
            if dest.suffix != ".md" or not dest.is_file():
                bad.append(f"{target!r}: an anchor into a file that is not a markdown page")
            elif anchor not in anchors(dest):
                bad.append(f"{target!r}: no heading with that anchor in {dest.relative_to(root.resolve())}")
    return bad


def test_docs_pages_exist():
    assert README.is_file()
    names = {p.name for p in DOCS.glob("*.md")}
    assert "configuration.md" in names
    # README's "Where to go next" links every docs page.
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README) if t.startswith("docs/")}
    assert {p.resolve() for p in DOCS.glob("*.md")} <= linked


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    if page == README:
        assert links(page), "the link parser found no link in README.md"
    assert broken_links(page) == []


def test_link_check_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "other.txt").write_text("x")
    (tmp_path / "docs" / "b.md").write_text("# B page\n\n## Some `code`: here, and-there_too\n\n## Some `code`: here, and-there_too\n")
    page = tmp_path / "docs" / "a.md"
    page.write_text(
        "# A\n\n## Local heading\n\n"
        "[ok](b.md) [ok](b.md#some-code-here-and-there_too) [ok](b.md#some-code-here-and-there_too-1)\n"
        "[ok](#local-heading) ![ok](../other.txt) [ok](https://example.com/x#y) `[code](missing.md)`\n"
        "```\n[code block](missing.md)\n```\n"
        "[bad file](missing.md) [bad anchor](b.md#nope) [bad local](#nope) [txt anchor](../other.txt#x)\n"
        "[outside](../../x.md) [scheme](s3://bucket/x) [absolute](/etc/passwd)\n"
        "[no\nanchor](b.md#some-code-here-and-there_too-2)\n"
    )
    bad = broken_links(page, root=tmp_path)
    assert [b.split(":")[0] for b in bad] == [
        "'missing.md'", "'b.md#nope'", "'#nope'", "'../other.txt#x'", "'../../x.md'", "'s3", "'/etc/passwd'",
        "'b.md#some-code-here-and-there_too-2'",
    ], bad


def test_slug_follows_github():
    assert slug("GPU status: designed for, not yet run") == "gpu-status-designed-for-not-yet-run"
    assert slug("The binding sample, and what fine-tuning reaches") == "the-binding-sample-and-what-fine-tuning-reaches"
    assert slug("Libraries chosen, and why") == "libraries-chosen-and-why"
    assert slug("`train.target` and snake_case") == "traintarget-and-snake_case"


# -- the configuration reference -------------------------------------------------------------------------

def _nested_models(annotation) -> list[type[BaseModel]]:
    """The pydantic models a field's type is (``X``, ``X | None``); a dict, list or tuple of anything is a
    leaf: the field itself is documented, not its items."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _nested_models(arg)]
    return []


def config_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every leaf field of the schema as a dotted name (``embed.model.seed``); a field whose type is a
    model stands for its own fields."""
    out = []
    for name, field in model.model_fields.items():
        nested = _nested_models(field.annotation)
        if nested:
            for sub in nested:
                out += config_fields(sub, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


_NAME = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)`")


def documented_fields(text: str) -> set[str]:
    """The dotted field names a page gives in backticks, anywhere; in a table row's first cell also the
    shared-row style ``train.num_workers``, ``use_gpu``: a bare name after a dotted one is in that
    dotted name's section, a bare name opening the cell is top-level."""
    out = {n for n in _NAME.findall(text) if "." in n}
    for line in _prose_lines(text):
        if not line.lstrip().startswith("|"):
            continue
        cells = line.strip().strip("|").split("|")
        section = ""
        for name in _NAME.findall(cells[0]):
            if "." in name:
                section = name.rpartition(".")[0] + "."
                out.add(name)
            else:
                out.add(section + name)
    return out


def test_config_fields_walk_nested_models():
    fields = config_fields()
    assert {"root", "embed.batch_size", "embed.model.name", "rerank.fusion.rrf_k", "train.lora.r",
            "train.clip_model.seed", "ray.env_vars", "embed.allowed_formats"} <= set(fields)
    assert "embed" not in fields and "embed.model" not in fields


def test_documented_fields_reads_shared_rows():
    text = ("| field | default | meaning |\n|---|---|---|\n| `root` | required | x |\n"
            "| `train.num_workers`, `use_gpu`, `worker_num_cpus` | 1, auto, 1.0 | `n` |\n")
    assert documented_fields(text) == {"root", "train.num_workers", "train.use_gpu", "train.worker_num_cpus"}


def test_every_config_field_is_in_the_configuration_reference():
    documented = documented_fields((DOCS / "configuration.md").read_text(encoding="utf-8"))
    missing = [f for f in config_fields() if f not in documented]
    assert missing == [], f"config fields missing from docs/configuration.md: {missing}"


def test_readme_is_a_landing_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    # .ci/run takes the test command from the two lines after this marker.
    i = lines.index("<!-- test-command -->")
    assert lines[i + 1] == "```bash" and lines[i + 2].startswith("python3 -m venv .venv")
