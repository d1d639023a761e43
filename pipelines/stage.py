"""The shape every stage's result shares: a dataclass whose :meth:`StageResult.stats` is the stage's row in
the run's ``stats.json`` (rows in / ok / rejected, wall time, a note for the run table, and its own figures)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict
from typing import Any


class StageResult(ABC):
    """Base of the stages' result dataclasses (``EmbedResult``, ``IndexResult``, ``SearchResult``,
    ``RerankResult``)."""

    wall_s: float

    @abstractmethod
    def counts(self) -> tuple[int, int, int]:
        """``(rows_in, rows_ok, rows_rejected)``: in == ok + rejected for a stage that loses nothing."""

    @abstractmethod
    def note(self) -> str:
        """One line for the run table."""

    def extra(self) -> dict[str, Any]:
        """The stage's own figures for ``stats.json`` (beyond the counts)."""
        return {}

    def stats(self) -> dict[str, Any]:
        rows_in, ok, rejected = self.counts()
        return {"rows_in": rows_in, "rows_ok": ok, "rows_rejected": rejected, "wall_s": self.wall_s,
                **self.extra(), "note": self.note()}

    def to_json(self) -> dict[str, Any]:
        """The whole result (its ``*_stats.json``)."""
        return asdict(self)  # type: ignore[call-overload]
