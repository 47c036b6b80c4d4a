"""What --influence writes in {output_dir}/influence/:

    scores.parquet     one row per scored step and example: step, learning_rate, example_id, score, trained_tokens
    influence.parquet  per example: influence = sum over its scored steps of learning_rate x score (TracIn),
                       times_seen, mean_score
    examples.jsonl     per example_id: its source, row index(es) in it, and its first 200 characters
    report.md          the 20 most helpful and 20 most harmful examples: text, influence, times seen
    influence_hist.png the distribution of influence over the examples

Positive influence: the gradient steps on this example lowered the reference set's loss.

Resume: scores are written (atomically) just before each checkpoint is saved, so a resumed run
finds every step up to its checkpoint in scores.parquet; rows of later steps (written before a
checkpoint that never completed) are dropped and recomputed, so the file has no duplicates or gaps.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

SCORES, INFLUENCE, EXAMPLES, REPORT, HISTOGRAM = (
    "scores.parquet", "influence.parquet", "examples.jsonl", "report.md", "influence_hist.png",
)  # fmt: skip
SCHEMA = pa.schema([
    ("step", pa.int64()), ("learning_rate", pa.float64()), ("example_id", pa.int64()), ("score", pa.float64()),
    ("trained_tokens", pa.int64()),
])  # fmt: skip
TOP = 20
PREVIEW_CHARS = 200


def _write_atomically(table: pa.Table, path: Path) -> None:
    partial = path.with_suffix(".partial")
    pq.write_table(table, partial)
    partial.replace(path)


class ScoreLog:
    """Every scored step's per-example scores, kept in memory and written to scores.parquet."""

    def __init__(self, directory: Path, resume_step: int = 0):
        self.directory = Path(directory)
        self.parts: list[pa.Table] = []
        existing = self.directory / SCORES
        if resume_step and existing.exists():
            table = pq.read_table(existing)
            kept = table.filter(pa.compute.less_equal(table["step"], resume_step))
            if kept.num_rows < table.num_rows:
                logger.info("influence: dropping scores of %d step(s) after checkpoint step %d; they are recomputed",
                            len(set(table["step"].to_pylist()) - set(kept["step"].to_pylist())), resume_step)  # fmt: skip
            self.parts.append(kept.cast(SCHEMA))

    def add(self, step: int, learning_rate: float, example_ids, scores, trained_tokens) -> None:
        n = len(example_ids)
        self.parts.append(pa.table({
            "step": np.full(n, step, dtype=np.int64), "learning_rate": np.full(n, learning_rate, dtype=np.float64),
            "example_id": np.asarray(example_ids, dtype=np.int64), "score": np.asarray(scores, dtype=np.float64),
            "trained_tokens": np.asarray(trained_tokens, dtype=np.int64),
        }, schema=SCHEMA))  # fmt: skip

    def table(self) -> pa.Table:
        table = pa.concat_tables(self.parts) if self.parts else SCHEMA.empty_table()
        self.parts = [table]  # one table from now on: concatenating many small ones is the cost
        return table

    def write(self) -> pa.Table:
        """scores.parquet and influence.parquet, each replaced atomically; returns the influence table."""
        self.directory.mkdir(parents=True, exist_ok=True)
        scores = self.table()
        _write_atomically(scores, self.directory / SCORES)
        influence = summed_influence(scores)
        _write_atomically(influence, self.directory / INFLUENCE)
        return influence


def summed_influence(scores: pa.Table) -> pa.Table:
    """Per example: influence = sum of learning_rate x score, times_seen, mean_score; most helpful first."""
    weighted = scores.append_column("influence", pa.compute.multiply(scores["learning_rate"], scores["score"]))
    grouped = weighted.group_by("example_id").aggregate([("influence", "sum"), ("score", "count"), ("score", "mean")])
    grouped = grouped.rename_columns([_rename(c) for c in grouped.column_names])
    return grouped.sort_by([("influence", "descending"), ("example_id", "ascending")])


def _rename(column: str) -> str:
    return {"influence_sum": "influence", "score_count": "times_seen", "score_mean": "mean_score"}.get(column, column)


def write_examples(directory: Path, descriptions: Iterable[dict]) -> None:
    """examples.jsonl: one {"example_id", "source", "rows", "text"} per line, written once per run."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / EXAMPLES
    partial = path.with_suffix(".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        for description in descriptions:
            handle.write(json.dumps(description, ensure_ascii=False) + "\n")
    partial.replace(path)


def read_examples(directory: Path) -> dict[int, dict]:
    path = directory / EXAMPLES
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as handle:
        return {row["example_id"]: row for row in map(json.loads, handle)}


def write_report(directory: Path, influence: pa.Table, top: int = TOP) -> None:
    """report.md with the most helpful and most harmful examples, and the histogram beside it."""
    examples = read_examples(directory)
    rows = influence.to_pylist()  # most helpful first
    helpful = [r for r in rows[:top] if r["influence"] > 0]
    harmful = [r for r in reversed(rows[-top:]) if r["influence"] < 0]
    lines = [
        "# Data influence", "",
        f"{len(rows):,} training examples scored against the reference set. Influence = sum over the steps that "
        "trained on an example of learning_rate x < grad of its loss, grad of the reference loss >: positive means "
        "its gradient steps lowered the reference loss.", "",
    ]  # fmt: skip
    for title, chosen in ((f"Most helpful ({len(helpful)})", helpful), (f"Most harmful ({len(harmful)})", harmful)):
        lines += [f"## {title}", "", "| influence | times seen | source | rows | text |", "|---:|---:|---|---|---|"]
        for r in chosen:
            ex = examples.get(r["example_id"], {})
            text = " ".join(str(ex.get("text", "")).split()).replace("|", "\\|")
            lines.append(f"| {r['influence']:.4g} | {r['times_seen']} | {ex.get('source', '')} | "
                         f"{_rows(ex.get('rows'))} | {text} |")  # fmt: skip
        lines.append("")
    if plot_histogram(influence, directory / HISTOGRAM):
        lines += [f"![distribution of influence]({HISTOGRAM})", ""]
    (directory / REPORT).write_text("\n".join(lines), encoding="utf-8")


def _rows(rows) -> str:
    if not rows:
        return ""
    return f"{rows[0]}-{rows[-1]}" if len(rows) > 3 else ", ".join(map(str, rows))


def plot_histogram(influence: pa.Table, path: Path) -> bool:
    try:  # the object-oriented API with the Agg canvas, as report.py does
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("No influence histogram: matplotlib is not installed")
        return False
    values = influence["influence"].to_numpy()
    if not len(values):
        return False
    figure = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.hist(values, bins=min(50, max(5, len(values) // 5)), color="tab:blue")
    axes.axvline(0, color="black", linewidth=0.8)
    axes.set_xlabel("influence (sum of learning rate x score)")
    axes.set_ylabel("training examples")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return True
