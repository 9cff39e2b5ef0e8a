"""The results of an evaluation's shards, merged into those of one run over all their examples.

Each part is the `evaluation.Evaluator.run()` result of consecutive examples
(a shard of a split). `merge` concatenates the per-example results in order
and merges the rest by kind:

- counts (ints, even when every part has the same) and seconds (the `timing`
  table, `seconds` fields) are summed;
- accuracies (fractions of the part's examples, or of its row's `n`) are
  recombined from their exact counts, so they equal the fraction over all
  examples bit for bit;
- values every part agrees on (settings, names, the surrogate's scales) are kept;
- a text the parts disagree on (a choice a part made from its own examples;
  `streaming` gives every shard the first shard's choice of the run the
  convergence checks repeat, so that one agrees) lists each value with its
  number of examples.

Summaries an `Evaluator` computes on its first examples only (`FIRST_EXAMPLES`,
e.g. each backward pass's distance from the end-to-end gradient, on its first
32) are taken from the first part, which holds the split's first examples: an
in-memory run's value when the first part holds as many (shards of 32 or more).

The merged per-example results are uint8 arrays (one byte per example and run:
a split of 50,000 examples and 30 runs holds 1.5 MB, not the 12 MB of Python
lists); `report.write_report` writes them as JSON lists.

Then `evaluation.finalize` recomputes everything derived from the per-example
results (headline, rows, convergence verdicts). Anything else the parts
disagree on (a list, a flag, a number that is not a fraction of its examples)
must be recomputed there; if it is not, `merge` raises instead of guessing.

A run that only some parts have (a check that a part's own choice added) is
left out, and listed under `results["runs_not_in_every_shard"]`; a run that
counts in the headline must be in every part, or `merge` raises, since
leaving it out could only raise the robust accuracy.
"""

import math

import numpy as np
from absl import logging

from s2s_tf.robustness import evaluation

_SUMMED_FLOATS = ("timing", "seconds")
# Results an Evaluator computes from its first examples (the gradient guard's batch).
FIRST_EXAMPLES = ("gradient_difference",)


class _Unmerged:
    """A value the parts disagree on and that only `finalize` can recompute."""

    def __init__(self, path, values):
        self.path, self.values = path, values

    def __repr__(self):
        return f"{self.path}: {self.values[:4]!r}"


def merge(parts, config):
    """Merges the results of consecutive shards; see the module docstring.

    Args:
      parts: `Evaluator.run()` results (JSON round trips are fine), in example order.
      config: the evaluation's `EvalConfig`.

    Returns:
      The results of all the parts' examples, finalized.

    Raises:
      ValueError: for no parts, parts whose per-example lists do not match their
        size, a headline run missing from some parts, or values that neither
        merge nor `finalize` can settle.
    """
    if not parts:
        raise ValueError("no shard results to merge")
    sizes = [part.get("num_examples") for part in parts]
    if not all(isinstance(n, int) and n > 0 for n in sizes):
        raise ValueError(f"every shard needs a positive num_examples, got {sizes}")
    per_example, dropped = _concatenate([p["per_example"] for p in parts], sizes, config)
    first = {k: parts[0][k] for k in FIRST_EXAMPLES if k in parts[0]}
    rest = [
        {k: v for k, v in part.items() if k != "per_example" and k not in first} for part in parts
    ]
    for part in rest:  # the runs' counts of runs left out go with them
        for key in dropped:
            part.get("runs", {}).pop(key, None)
    merged = _merge(rest, sizes, "")
    merged.update(first)
    merged["per_example"] = per_example
    if dropped:
        merged["runs_not_in_every_shard"] = dropped
    merged = evaluation.finalize(merged, config)
    left = list(_unmerged(merged))
    if left:
        raise ValueError(
            f"the shards disagree on {left}, which nothing recomputes from the per-example "
            "results; the shards cannot be merged into one run's results"
        )
    return merged


def _concatenate(per_examples, sizes, config):
    """Per-example lists joined in order; runs missing from some parts are left out."""
    counts = {}
    for index, (runs, size) in enumerate(zip(per_examples, sizes, strict=True)):
        for key, values in runs.items():
            if len(values) != size:
                raise ValueError(
                    f"run {key!r} has {len(values)} results in shard {index} of {size} examples"
                )
            counts[key] = counts.get(key, 0) + 1
    partial = {k: c for k, c in counts.items() if c < len(per_examples)}
    budget = [k for k in partial if _counts_in_headline(k, config)]
    if budget:
        raise ValueError(
            f"runs {budget} count in the headline but are missing from some shards; "
            "leaving them out could only raise the robust accuracy"
        )
    dropped = {k: f"in {c} of {len(per_examples)} shards" for k, c in partial.items()}
    if dropped:
        logging.warning("runs left out of the merged results (not in every shard): %s", dropped)
    joined = {
        key: np.concatenate([compact(runs[key]) for runs in per_examples])
        for key in counts
        if key not in partial
    }
    return joined, dropped


def compact(values):
    """One run's per-example results (0/1) as uint8: a byte per example, not a Python int."""
    return np.asarray(values, np.uint8)


def _counts_in_headline(run, config):
    one = {"per_example": {"clean/defended": [1], run: [0]}}
    return any(row["robust"] == 0 for row in evaluation.headline(one, config.eps).values())


def _merge(values, weights, path):
    """Merges the parts' values at `path` (see the module docstring for the rules)."""
    if all(isinstance(v, dict) for v in values):
        if all(isinstance(v.get("n"), int) for v in values):
            weights = [v["n"] for v in values]
        keys = list(dict.fromkeys(k for v in values for k in v))
        merged = {}
        for key in keys:
            have = [(v[key], w) for v, w in zip(values, weights, strict=True) if key in v]
            merged[key] = _merge([v for v, _ in have], [w for _, w in have], f"{path}/{key}")
        return merged
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return sum(values)  # counts, even when every part has the same
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if numbers and any(name in path.split("/") for name in _SUMMED_FLOATS):
        return math.fsum(values)
    if all(_same(v, values[0]) for v in values[1:]):
        return values[0]  # a setting, a name, or a fraction every part shares
    if numbers:
        return _fraction(values, weights, path)
    if all(isinstance(v, str) for v in values):
        examples = {}
        for value, weight in zip(values, weights, strict=True):
            examples[value] = examples.get(value, 0) + weight
        return ", ".join(f"{value} ({n} examples)" for value, n in examples.items())
    return _Unmerged(path, values)


def _fraction(values, weights, path):
    """Fractions of their parts' examples, recombined from the exact counts."""
    counts = [v * w for v, w in zip(values, weights, strict=True)]
    if any(abs(c - round(c)) > 1e-6 * max(1, w) for c, w in zip(counts, weights, strict=True)):
        return _Unmerged(path, values)  # not a fraction of its examples: no rule fits
    return sum(round(c) for c in counts) / sum(weights)


def _same(a, b):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _unmerged(value):
    if isinstance(value, _Unmerged):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _unmerged(item)
    elif isinstance(value, list):
        for item in value:
            yield from _unmerged(item)
