"""Writes the robustness report: robustness.json, report.md and PNG plots.

Every number in `report.md` is read from the same dict that is written to
`robustness.json`, so the two cannot disagree.
"""

import datetime
import json
import os
import platform

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from s2s_tf import constants  # noqa: E402
from s2s_tf.analysis import claims_report  # noqa: E402
from s2s_tf.robustness import threat_models  # noqa: E402


def versions():
    """Versions of the software that produced the numbers."""
    import importlib.metadata

    out = {"python": platform.python_version(), "machine": platform.machine()}
    for package in ("tensorflow", "tensorflow-cpu", "keras", "cleverhans", "s2s_tf"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    out["cpu_count"] = os.cpu_count()
    return out


def jsonable(value):
    """`json.dump`'s `default`: numpy arrays (merged per-example results) and scalars."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable: {value!r:.80}")


def write_report(document, outdir, examples=None, histograms=None, plots=None):
    """Writes robustness.json, report.md and the plots into `outdir`.

    Args:
      document: JSON-serialisable dict with keys "config", "results" (from
        `evaluation.Evaluator`), "checks" (from `evaluation.sanity_checks`),
        "gradients" (summary numbers per model) and optionally "meta".
      outdir: output directory (created).
      examples: optional dict of name -> float images [K, H, W, C] in [0, 1]
        (rows of the example figure, e.g. clean / adversarial / reconstruction)
        plus "gradient" ([K, H, W, C], any range).
      histograms: optional dict of model name -> (bin_edges, counts).
      plots: optional dict of name -> path of further plots already written
        into `outdir` (linked from the report).

    Returns:
      A dict of artefact name -> path.
    """
    os.makedirs(outdir, exist_ok=True)
    document = dict(document)
    document.setdefault("meta", {})
    document["meta"].setdefault("versions", versions())
    document["meta"].setdefault("date", datetime.datetime.now(datetime.UTC).isoformat())
    paths = {"json": constants.report_json(outdir), **(plots or {})}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(document, f, indent=2, sort_keys=True, default=jsonable)
    paths["accuracy_plot"] = plot_accuracy_vs_eps(
        document["results"], os.path.join(outdir, "accuracy_vs_eps.png")
    )
    if histograms:
        paths["gradient_plot"] = plot_histograms(
            histograms, os.path.join(outdir, "gradient_histograms.png")
        )
    if examples:
        paths["examples_plot"] = plot_examples(examples, os.path.join(outdir, "examples.png"))
    paths["markdown"] = os.path.join(outdir, "report.md")
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(markdown(document, {k: os.path.basename(v) for k, v in paths.items()}))
    return paths


# One formatting of percentages and markdown tables for the whole report.
_pct = claims_report._pct
_table = claims_report._table


def markdown(document, files):
    """The report as Markdown (tables of `document`, links to the plots in `files`)."""
    results = document["results"]
    out = ["# S2SNet robustness report", ""]
    meta = document.get("meta", {})
    out.append(
        f"Date: {meta.get('date', '?')}; versions: `{json.dumps(meta.get('versions', {}))}`."
    )
    out.append(f"Examples: {results['num_examples']}; eps in [0, 1] pixel units (shown as /255).")
    if meta.get("preset"):
        out.append(f"Attack preset: `{meta['preset']}`.")
    out += ["", "## Clean accuracy", ""]
    out.append(_table(["model", "accuracy"], [(k, _pct(v)) for k, v in results["clean"].items()]))
    out += _headline_section(results.get("headline", {}))
    out += _convergence_section(results)
    out += _cascade_section(results)
    for threat, table in results.get("threats", {}).items():
        out += _threat_section(threat, table)
    out += _transfer_section(results.get("transfer"))
    out += _adaptive_section(document.get("adaptive", []))
    out += ["", "## Sanity checks", ""]
    rows = [
        (
            "PASS" if c["passed"] else ("undecided" if c["passed"] is None else "**FAIL**"),
            c["name"],
            c["detail"],
        )
        for c in document.get("checks", [])
    ]
    out.append(_table(["result", "check", "detail"], rows))
    out += _gradient_section(document.get("gradients", {}))
    out += claims_report.sections(document)
    out += ["", "## Plots", ""]
    plot_keys = ("accuracy_plot", "gradient_plot", "examples_plot")
    plot_keys += ("effective_examples_plot", "effective_scatter_plot")
    for key in plot_keys:
        if key in files:
            out.append(f"![{key}]({files[key]})")
    return "\n".join(out) + "\n"


def _headline_section(headline):
    if not headline:
        return []
    rows = [
        (
            eps,
            _pct(h["robust_accuracy"]),
            f"{_pct(h['ci95'][0])} - {_pct(h['ci95'][1])}",
            f"{h['robust']}/{h['n']}",
            len(h["runs"]),
        )
        for eps, h in headline.items()
    ]
    return [
        "",
        "## Robust accuracy (per-example worst case over every attack and threat model)",
        "",
        "An example counts as robust at an eps only if the defended model classifies it "
        "correctly clean and after every attack run at that eps (AutoAttack's robust accuracy). "
        "Attacks run on a subset (gradient-free) constrain their examples only.",
        "",
        _table(["eps", "robust accuracy", "95% CI (Wilson)", "robust / n", "runs"], rows),
    ]


_ROUND_NAMES = {"more_steps": "2x", "more_restarts": "+extra"}


def _convergence_section(results):
    """Whether more attack effort still fooled more examples, per eps (see `checks.convergence`)."""
    convergence = results.get("convergence")
    if not convergence:
        return []
    verdict = {True: "converged", False: "**NOT CONVERGED**", None: "undecided"}
    rows = []
    for eps, row in convergence.items():
        cells = {
            w: f"{row[w]['only_b']} more / {row[w]['only_a']} fewer (p = {row[w]['p_value']:.3g})"
            for w in row
            if w.startswith("more_")
        }
        steps, restarts = (
            "; ".join(
                f"{_ROUND_NAMES.get(w, w.removeprefix(f'{rerun}_'))}: {cell}"
                for w, cell in cells.items()
                if w.startswith(rerun)
            )
            or "n/a"
            for rerun in ("more_steps", "more_restarts")
        )
        rows.append((eps, row.get("source"), steps, restarts, verdict[row["converged"]]))
    out = [
        "",
        f"**Attack convergence: {verdict[results.get('converged')]}.** At each eps the reference "
        "attack is rerun, on the threat model where it fooled the most, with twice the steps and "
        "with more restarts, and in further rounds with 4x, 8x, ... the steps and twice the "
        "extra restarts (rK: K restarts), each round on what the one before left robust (every "
        "rerun also counts in the worst case above). When the last round of either still fools "
        "significantly more examples (exact McNemar), the headline is not converged: stronger "
        "attacks would likely lower it further.",
        "",
        _table(["eps", "rerun on", "more steps (rounds)", "more restarts", "verdict"], rows),
    ]
    difference = results.get("gradient_difference", {})
    if difference:
        out += [
            "",
            "Distance of each threat model's input gradient from the end-to-end one, "
            "|g - g_e2e| / |g_e2e| on the first examples (near 0: the same backward pass; a "
            "surrogate near 0 would be hard routing again): "
            + ", ".join(f"{k} {v:.2f}" for k, v in difference.items()),
        ]
    sweep = results.get("surrogate_sweep", {})
    if sweep:
        cells = [
            f"{eps}: "
            + ", ".join(f"{t} {n}" for t, n in row["fooled"].items())
            + f" (most: {row['winner']})"
            for eps, row in sweep.items()
        ]
        out += ["", "Surrogate temperatures (examples fooled by the reference attack): "]
        out += [f"- {c}" for c in cells]
    return out


def _cascade_section(results):
    """The runs in order at each eps: examples attacked, newly fooled, seconds."""
    runs = results.get("runs", {})
    if not runs:
        return []
    rows = [
        (
            info["eps"],
            f"{info['threat']} / {info['attack']}" + ("" if info["full"] else " (cascade)"),
            info["attacked"],
            info["fooled"],
            info["new"],
            info.get("robust_after", ""),
            f"{info.get('seconds', 0.0):.1f}",
        )
        for info in runs.values()
        if not info["threat"].startswith("check_large_eps")
    ]
    return [
        "",
        "## Attack runs in order",
        "",
        "Reference runs attack every clean-correct example; cascade runs only the examples still "
        "robust after every earlier run at that eps. 'new': fooled by no earlier run.",
        "",
        _table(["eps", "run", "attacked", "fooled", "new", "robust after", "seconds"], rows),
    ]


def _threat_title(threat):
    base, _, temperature = threat.partition("@")
    if base not in threat_models.THREATS:
        return threat
    title = threat_models.THREATS[base].title
    return f"{title}, relative temperature {temperature}" if temperature else title


def _threat_section(threat, table):
    if not table:
        return []
    title = _threat_title(threat)
    eps_keys = list(next(iter(table.values())).keys())
    rows = []
    for attack, by_eps in table.items():
        if all("defended" in by_eps[e] for e in eps_keys):
            rows.append([f"{attack} (defended)"] + [_pct(by_eps[e]["defended"]) for e in eps_keys])
        else:
            rows.append(
                [f"{attack} (cascade: worst case so far)"]
                + [_pct(by_eps[e].get("robust_after")) for e in eps_keys]
            )
        if any("classifier" in by_eps[e] for e in eps_keys):
            rows.append(
                [f"{attack} (classifier alone)"]
                + [_pct(by_eps[e].get("classifier")) for e in eps_keys]
            )
    n = next(iter(next(iter(table.values())).values())).get("n", "?")
    return ["", f"## {title}", "", f"{n} examples.", "", _table(["attack \\ eps", *eps_keys], rows)]


def _transfer_section(transfer):
    if not transfer:
        return []
    names = list(transfer["matrix"])
    rows = [[src] + [_pct(transfer["matrix"][src][t]) for t in names] for src in names]
    return [
        "",
        f"## Transfer ({transfer['attack']}, eps {transfer['eps'] * 255:g}/255)",
        "",
        "Rows: the model the examples were made on; columns: the model evaluated.",
        "",
        _table(["source \\ target", *names], rows),
        "",
        "Every model here attacked end to end (claim 5, below, remakes the defended rows "
        "through their surrogates).",
    ]


def _adaptive_section(rows):
    if not rows:
        return []
    table = [
        (r["eps"], r["a"], r["b"], r["only_a"], r["only_b"], f"{r['p_value']:.3g}", r["winner"])
        for r in rows
    ]
    return [
        "",
        "## Which backward pass attacks best (white-box, BPDA, soft-routing surrogate)",
        "",
        "Paired on the same examples: fooled by A only / by B only, exact McNemar p; the winner "
        "is the run that fools significantly more (p < 0.05), else neither.",
        "",
        _table(["eps", "A", "B", "A only", "B only", "p", "stronger"], table),
    ]


def _gradient_section(gradients):
    if not gradients:
        return []
    keys = sorted({k for stats in gradients.values() for k in stats})
    rows = [
        [name] + [f"{stats[k]:.4g}" if isinstance(stats.get(k), float) else "" for k in keys]
        for name, stats in gradients.items()
    ]
    return [
        "",
        "## Input gradients",
        "",
        "class_specificity: mean cosine similarity between the input gradients of each "
        "model's own top classes' logits (higher = less class-specific; claim 2 below uses "
        "the class-dependent share). structure_alignment: correlation of |gradient| with the "
        "image's Sobel edge magnitude.",
        "",
        _table(["model", *keys], rows),
    ]


def plot_accuracy_vs_eps(results, path):
    """Defended accuracy against eps, one line per threat model and attack."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for threat, table in results.get("threats", {}).items():
        if threat.startswith("check_"):
            continue
        for attack, by_eps in table.items():
            xs = [_eps_value(e) for e in by_eps]
            ys = [100 * v.get("defended", v.get("robust_after", 0.0)) for v in by_eps.values()]
            ax.plot(xs, ys, marker="o", label=f"{threat}: {attack}")
    headline = results.get("headline", {})
    if headline:
        xs = [_eps_value(e) for e in headline]
        ys = [100 * h["robust_accuracy"] for h in headline.values()]
        ax.plot(xs, ys, color="black", lw=2.5, marker="s", label="worst case (all attacks)")
    ax.axhline(100 * results["clean"]["defended"], color="gray", ls="--", label="clean")
    ax.set_xlabel("eps (/255)")
    ax.set_ylabel("defended accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def save_figure(fig, path):
    """Lays out `fig`, writes it to `path` as a PNG and frees it; returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _eps_value(key):
    return float(key.split("/")[0])


def plot_histograms(histograms, path):
    """Input-gradient histograms per model (log counts)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (edges, counts) in histograms.items():
        edges = np.asarray(edges)
        centers = (edges[:-1] + edges[1:]) / 2
        ax.semilogy(centers, np.maximum(np.asarray(counts), 0.5), label=name)
    ax.set_xlabel("input gradient value")
    ax.set_ylabel("count")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_examples(rows, path):
    """A grid: one row per entry of `rows`, one column per example image."""
    names = list(rows)
    cols = min(len(v) for v in rows.values())
    fig, axes = plt.subplots(
        len(names), cols, figsize=(1.8 * cols, 1.8 * len(names)), squeeze=False
    )
    for r, name in enumerate(names):
        for c in range(cols):
            image = np.asarray(rows[name][c], np.float32)
            if name == "gradient":  # show magnitude, scaled per image
                image = np.abs(image).sum(-1)
                image = image / (image.max() + 1e-12)
            axes[r][c].imshow(np.clip(image, 0, 1), cmap="gray" if image.ndim == 2 else None)
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        axes[r][0].set_ylabel(name, fontsize=8)
    return save_figure(fig, path)
