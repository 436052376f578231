"""The pipeline report: one record per pass run, printed as a table or saved as HTML.

Each record has the pass's time, nodes / parameters / MACs before and after, the worst error
its contract check measured (when verified), its statistics and where it did not apply and why.

Beside the records a report holds what its HTML page draws (:meth:`Report.save_html`, see
:mod:`graphpress.pipeline.report_html`): ``graphs``, the graph before the first pass and after
every pass that changed it, with the nodes each pass added, removed and changed
(:mod:`graphpress.pipeline.report_graph` records them while the pipeline runs); ``charts``,
per-pass chart data (channels kept per pruning group, per-operand quantization SQNR and
ranges, tokens per block); and ``measurements``, rows of measured figures per stage
(accuracy, parameters, bytes, latency) that a caller adds with :meth:`Report.measure`.
``to_dict`` is the summary that ``manifest.json`` embeds; ``to_json`` / ``from_json`` keep
everything, which is what ``report.json`` in a saved folder holds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["PassRecord", "Report"]


@dataclass
class PassRecord:
    name: str
    iteration: int
    seconds: float
    changed: bool
    nodes: tuple[int, int]
    parameters: tuple[int, int]
    macs: tuple[int, int]
    contract: str
    # bytes of parameters, buffers and constant tensors (as stored: packed weights count packed)
    weight_bytes: tuple[int, int] = (0, 0)
    contract_kind: str = ""                           # exact / reference / statistical / unchecked
    contract_tolerance: tuple[float, float] = (0.0, 0.0)  # (rtol, atol)
    max_error: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # statistical contracts
    stats: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # what the pass returned in PassResult.details (e.g. the pruning plan); not serialized
    details: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _pair(pair: tuple[int, int]) -> str:
    a, b = pair
    return _count(a) if a == b else f"{_count(a)} -> {_count(b)}"


@dataclass
class Report:
    """What a compile did; ``str(report)`` is a table, ``to_dict()`` is JSON-ready."""

    records: list[PassRecord] = field(default_factory=list)
    frontend: str = ""
    backend: str = ""
    trace_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    # what the HTML page draws (see the module docstring); JSON-ready data
    graphs: list[dict[str, Any]] = field(default_factory=list, repr=False)
    charts: list[dict[str, Any]] = field(default_factory=list, repr=False)
    measurements: list[dict[str, Any]] = field(default_factory=list, repr=False)
    title: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The summary: every record (without ``details``), the extras; no graphs or charts."""
        return {"frontend": self.frontend, "backend": self.backend,
                "trace_seconds": self.trace_seconds, "extra": self.extra,
                "records": [{k: v for k, v in asdict(r).items() if k != "details"}
                            for r in self.records]}

    def to_json(self) -> str:
        """Everything the HTML page needs, as JSON (``report.json`` of a saved folder)."""
        return json.dumps({**self.to_dict(), "title": self.title, "graphs": self.graphs,
                           "charts": self.charts, "measurements": self.measurements},
                          default=str, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Report:
        data = json.loads(text)
        report = cls.from_dict(data)
        report.title = data.get("title", "")
        report.graphs = data.get("graphs", [])
        report.charts = data.get("charts", [])
        report.measurements = data.get("measurements", [])
        return report

    def measure(self, stage: str, **figures: float | int | str | None) -> None:
        """Add a row of measured figures, e.g. ``measure("int8", accuracy=0.97, bytes=1234,
        latency_ms=0.2)``; the HTML page draws a bar chart per figure. Known keys are
        formatted (``accuracy``, ``cosine``, ``parameters``, ``bytes``, ``latency_ms``)."""
        self.measurements.append({"stage": stage, **figures})

    def extend(self, other: Report, stage: str = "") -> Report:
        """Append ``other``'s records, graphs, charts and extras (a later compile of the same
        job: e.g. fine-tuning between two pipelines), its records' names prefixed with
        ``stage/`` when given; returns self."""
        offset = len(self.records)
        for record in other.records:
            name = f"{stage}/{record.name}" if stage else record.name
            self.records.append(replace(record, name=name))
        for graph in other.graphs:
            entry = dict(graph)
            entry["record"] = (entry["record"] + offset) if entry.get("record") is not None \
                else None
            entry["stage"] = stage or entry.get("stage", "")
            self.graphs.append(entry)
        for chart in other.charts:
            self.charts.append({**chart, "record": chart["record"] + offset})
        self.measurements.extend(other.measurements)
        for key, value in other.extra.items():
            self.extra[f"{stage}: {key}" if stage else key] = value
        self.trace_seconds += other.trace_seconds
        if other.backend:
            self.backend = other.backend
        return self

    def save_html(self, path: str | Path) -> Path:
        """Write the report as one self-contained HTML file (no network needed to view it)."""
        from graphpress.pipeline.report_html import render_html

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_html(self), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        records = []
        for r in data.get("records", []):
            r = dict(r)
            for key in ("nodes", "parameters", "macs", "contract_tolerance"):
                if key in r:
                    r[key] = tuple(r[key])
            r["skipped"] = [tuple(s) for s in r.get("skipped", [])]
            records.append(PassRecord(**r))
        return cls(records, data.get("frontend", ""), data.get("backend", ""),
                   data.get("trace_seconds", 0.0), data.get("extra", {}))

    def details(self, pass_name: str) -> dict[str, Any]:
        """``PassResult.details`` of the last run of the named pass (e.g. the pruning plan)."""
        for record in reversed(self.records):
            if record.name == pass_name:
                return record.details
        raise KeyError(f"no pass named {pass_name!r} ran; ran: "
                       f"{', '.join(r.name for r in self.records) or 'none'}")

    def __str__(self) -> str:
        header = ("pass", "iter", "time ms", "nodes", "params", "MACs", "weight bytes",
                  "max error", "result")
        rows = [header]
        for r in self.records:
            err = "-" if r.max_error is None else f"{r.max_error:.2e}"
            if r.metrics:
                err += " (" + ", ".join(f"{k} {v:.4g}" for k, v in r.metrics.items()) + ")"
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items())
            result = ("changed" if r.changed else "no change") + (f" ({stats})" if stats else "")
            rows.append((r.name, str(r.iteration), f"{r.seconds * 1e3:.1f}", _pair(r.nodes),
                         _pair(r.parameters), _pair(r.macs), _pair(r.weight_bytes), err, result))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [f"graphpress report (frontend={self.frontend}, backend={self.backend}, "
                 f"trace {self.trace_seconds * 1e3:.0f} ms)"]
        for i, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        for key, value in self.extra.items():
            lines.append(f"{key}: {value}")
        summaries = [(r.name, line) for r in self.records
                     for line in r.details.get("summary", [])]
        if summaries:
            lines.append("details:")
            lines.extend(f"  {name}: {line}" for name, line in summaries)
        skipped = [(r.name, node, why) for r in self.records for node, why in r.skipped]
        if skipped:
            lines.append("not applied:")
            lines.extend(f"  {name}: {node}: {why}" for name, node, why in skipped)
        return "\n".join(lines)
