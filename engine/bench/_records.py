"""The benchmark's records: a sweep's result as plain data the renderers read.

`_html` takes `BenchRecord`; `BenchReport` (in `_report`) is the same record with its
renderings, so no renderer imports the report back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from ..endpoint import Limits
from ._stats import LevelResult
from ._sweep import BenchSettings

__all__ = ["BenchRecord", "Projection", "Recommendation"]


@dataclass(frozen=True, slots=True)
class Projection:
    """Wall time and cost of ``examples`` requests at the best level's rate."""

    examples: int
    concurrency: int
    requests_per_s: float
    wall_s: float
    cost_usd: float | None


@dataclass(frozen=True, slots=True)
class Recommendation:
    """The ``[model.limits]`` to put in the run file, with the reasons.

    ``input_tpm`` / ``output_tpm`` are for a provider that limits input and output
    tokens apart (Anthropic's ITPM and OTPM).
    """

    concurrency: int | None
    rpm: float | None
    tpm: float | None
    limit_found: bool
    notes: tuple[str, ...]
    input_tpm: float | None = None
    output_tpm: float | None = None

    def to_toml(self, style: str = "table", *, burst: float | None = None) -> str:
        """TOML lines to paste into the run file (the notes as comments).

        ``style="table"``: a ``[model.limits]`` table; ``style="inline"``: the one line
        ``limits = { ... }`` that goes under ``[model]``, for a run file that already
        writes its limits inline (TOML refuses a table defined twice).  ``burst``, when
        the run file sets one, is kept: the sweep does not measure it.
        """
        if style not in ("table", "inline"):
            raise ValueError(f"style must be 'table' or 'inline', got {style!r}")
        lines = [f"# {note}" for note in self.notes]
        if self.concurrency is None:
            return "\n".join(lines)
        given = (
            ("concurrency", self.concurrency),
            ("rpm", self.rpm),
            ("tpm", self.tpm),
            ("input_tpm", self.input_tpm),
            ("output_tpm", self.output_tpm),
        )
        keys = [f"{key} = {_toml_number(v)}" for key, v in (*given, ("burst", burst)) if v]
        if style == "inline":
            lines.append(f"limits = {{ {', '.join(keys)} }}")
        else:
            lines += ["[model.limits]", *keys]
        return "\n".join(lines)


def _toml_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True, slots=True)
class BenchRecord:
    """The whole sweep: the levels, the best one, the projection, the recommendation.

    ``cost_usd`` is what the sweep spent by the price table (an attempt that may have
    been billed without an answer counts at its worst case when a cost cap is set);
    ``stopped`` says why the sweep ended early (a cap, a failing endpoint), if it did.
    """

    endpoint: str
    model: str
    settings: BenchSettings
    configured: Limits | None
    levels: tuple[LevelResult, ...]
    attempts: int
    cost_usd: float | None
    stopped: str | None
    synthetic: bool
    dataset_examples: int
    best: LevelResult | None
    projection: Projection | None
    recommendation: Recommendation

    @property
    def answered(self) -> int:
        """Requests answered over the whole sweep."""
        return sum(level.requests for level in self.levels)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: one object per level under ``levels``."""
        configured = self.configured
        return {
            "endpoint": self.endpoint,
            "model": self.model,
            "settings": asdict(self.settings),
            "configured_limits": asdict(configured) if configured is not None else None,
            "synthetic": self.synthetic,
            "dataset_examples": self.dataset_examples,
            "attempts": self.attempts,
            "cost_usd": self.cost_usd,
            "stopped": self.stopped,
            "levels": [level.to_dict() for level in self.levels],
            "best_concurrency": self.best.concurrency if self.best is not None else None,
            "projection": asdict(self.projection) if self.projection is not None else None,
            "recommendation": {
                **asdict(self.recommendation),
                "toml": self.recommendation.to_toml(),
            },
        }

    def to_json(self, **kwargs: Any) -> str:
        """`to_dict` as JSON (``kwargs`` go to `json.dumps`)."""
        return json.dumps(self.to_dict(), **kwargs)
