"""--mixture_from_influence: new source weights from data influence, written to {output_dir}/influence/mixture.yaml
as a data section the next run takes with --config.

The rules:
1. A source's summed influence is the sum of its examples' influence (influence.parquet: over the scored steps,
   learning rate x the dot product of the example's gradient with the reference set's), examples.jsonl saying
   which source each example id belongs to. By TracIn's first-order argument this sum estimates how much the
   steps on that source lowered the reference loss. Its positive part counts: a source whose summed influence
   is negative (it raised the reference loss on the whole) counts 0. The net sum is used rather than the sum
   of the positive examples alone, which would reward a source whose examples help and harm in equal measure.
2. New weights are proportional to that, normalised to sum to 1, then every source is raised to at least
   FLOOR (5 %; 0.5 / n with more than 10 sources) of the mix, the others scaled down to make room, so no
   source vanishes and the next scores can still see it.
3. The summed influence grows with how much of a source the run trained on, so the rule multiplies the old
   mix by each source's value per trained token (a multiplicative-weights step): from uniform weights it
   ranks sources by that value; run again, it sharpens.
4. If no source has a positive sum (nothing measurably helped), the run's own weights are written back
   unchanged, with a note.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from transformers import TrainerCallback

from tuner.data import specs as source_specs
from tuner.influence import files as influence_report

logger = logging.getLogger(__name__)

MIXTURE = "mixture.yaml"
FLOOR = 0.05


def floor_for(n_sources: int) -> float:
    return min(FLOOR, 0.5 / n_sources)


def source_influence(directory: Path) -> dict[str, dict]:
    """Per source: examples scored, trained tokens scored, summed influence, and its helpful and harmful parts."""
    influence = pq.read_table(directory / influence_report.INFLUENCE).to_pylist()
    scores = pq.read_table(directory / influence_report.SCORES, columns=["example_id", "trained_tokens"]).to_pylist()
    source_of = {e: row["source"] for e, row in influence_report.read_examples(directory).items()}
    out: dict[str, dict] = {}
    for row in influence:
        entry = out.setdefault(source_of[row["example_id"]], {"examples": 0, "tokens": 0, "influence": 0.0, "helpful": 0.0, "harmful": 0.0})
        entry["examples"] += 1
        entry["influence"] += row["influence"]
        entry["helpful" if row["influence"] > 0 else "harmful"] += row["influence"]
    for row in scores:
        out[source_of[row["example_id"]]]["tokens"] += row["trained_tokens"]
    return out


def new_weights(summed: dict[str, float], old: dict[str, float]) -> tuple[dict[str, float], str]:
    """(weights summing to 1, how they were chosen) from each source's summed influence (rules 1, 2, 4)."""
    names = list(old)
    positive = {name: max(summed.get(name, 0.0), 0.0) for name in names}
    total = sum(positive.values())
    if not total > 0:
        plain = sum(old.values())
        return {n: old[n] / plain for n in names}, "no source has a positive summed influence: the run's weights, unchanged"
    return with_floor({n: positive[n] / total for n in names}, floor_for(len(names))), "proportional to summed influence"


def with_floor(shares: dict[str, float], floor: float) -> dict[str, float]:
    """Shares raised to at least `floor`, the others scaled down in proportion so that all sum to 1."""
    fixed: set[str] = set()
    while True:
        free = 1.0 - floor * len(fixed)
        rest = sum(v for n, v in shares.items() if n not in fixed)
        out = {n: floor if n in fixed else v * free / rest for n, v in shares.items()}
        low = {n for n, v in out.items() if v < floor and n not in fixed}
        if not low:
            return out
        fixed |= low


def mixture_yaml(cfg, specs: list, table: dict[str, dict], weights: dict[str, float], how: str) -> str:
    """The data section of the next run, with the figures it came from as comments."""
    lines = [
        "# Source weights from data influence (tuner --mixture_from_influence); pass as --config, or merge into yours.",
        f"# Weights {how}; each source at least {floor_for(len(specs)):.0%} (see tuner/influence_mixture.py).",
        f"# {'source':<16}{'examples':>9}{'tokens':>10}{'summed':>12}{'helpful':>12}{'harmful':>12}{'old':>8}{'new':>8}",
    ]
    old_total = sum(s.weight for s in specs)
    for spec in specs:
        t = table.get(spec.name, {"examples": 0, "tokens": 0, "influence": 0.0, "helpful": 0.0, "harmful": 0.0})
        lines.append(f"# {spec.name:<16}{t['examples']:>9,}{t['tokens']:>10,}{t['influence']:>12.4g}{t['helpful']:>12.4g}"
                     f"{t['harmful']:>12.4g}{spec.weight / old_total:>8.3f}{weights[spec.name]:>8.3f}")  # fmt: skip
    section = {
        "datasets": [spec.as_entry(round(weights[spec.name], 4)) for spec in specs],
        "mix_unit": cfg.mix_unit,
        "mix_exhausted": cfg.mix_exhausted,
    }
    return "\n".join(lines) + "\n" + yaml.safe_dump(section, sort_keys=False, allow_unicode=True)


def write_mixture(cfg, directory: Path) -> Path:
    specs = source_specs.specs_from_options(cfg)
    table = source_influence(directory)
    summed = {name: entry["influence"] for name, entry in table.items()}
    weights, how = new_weights(summed, {s.name: s.weight for s in specs})
    if not math.isclose(sum(weights.values()), 1.0, rel_tol=1e-9):
        raise AssertionError(f"weights {weights} do not sum to 1")
    path = directory / MIXTURE
    partial = path.with_suffix(".partial")
    partial.write_text(mixture_yaml(cfg, specs, table, weights, how), encoding="utf-8")
    partial.replace(path)
    logger.info("New source weights (%s) written to %s: %s", how, path, json.dumps({n: round(w, 4) for n, w in weights.items()}))
    return path


class MixtureFromInfluence(TrainerCallback):
    """At the end of training, on the main process, after the influence files are written."""

    def __init__(self, cfg):
        self.cfg = cfg

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_mixture(self.cfg, Path(args.output_dir) / "influence")
