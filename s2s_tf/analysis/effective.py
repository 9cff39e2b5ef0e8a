"""Effective perturbations (the paper's claim 3): what of an attack reaches the classifier?

Folz et al. interpret adversarial perturbations through the effective input
signal: the classifier behind an S2SNet never sees x + δ, only the purifier's
output P(x + δ), so the perturbation it receives is P(x + δ) - P(x). Per
example this measures ||P(x + δ) - P(x)|| against ||δ|| in L2 and L-inf and
summarises the norms and their ratio (passed-on / input) with seeded bootstrap
intervals. A ratio below 1 says the purifier damps the attack's perturbation,
not that the defended model is robust: a small passed-on change can still flip
the classifier.

δ = x_adv - x and P(x_adv) - P(x) are both differences of float32 arrays, so an
identity purifier passes on exactly δ (ratio 1). Examples the attack left
unchanged (δ = 0, e.g. already misclassified ones) have no ratio; they are
counted and left out of the ratios. Plots are PNG files (matplotlib, Agg).
"""

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from s2s_tf.analysis import gradient_analysis as ga  # noqa: E402
from s2s_tf.analysis import report  # noqa: E402
from s2s_tf.robustness import stats  # noqa: E402

NORMS = ("l2", "linf")


def _flat_norms(diff):
    flat = diff.astype(np.float64).reshape(len(diff), -1)
    return {"l2": np.linalg.norm(flat, axis=1), "linf": np.abs(flat).max(axis=1, initial=0.0)}


def _purify(purifier, images, batch_size):
    # A compiled, batched forward pass: predict_logits returns whatever the model outputs.
    return ga.predict_logits(purifier, images, batch_size)


def _paired(clean, adversarial):
    """Validated float32 arrays: adversarial [n, ...] and the clean images clean[:n]."""
    clean = np.asarray(clean, np.float32)
    adversarial = np.asarray(adversarial, np.float32)
    if adversarial.ndim != 4 or adversarial.shape[1:] != clean.shape[1:]:
        raise ValueError(f"adversarial {adversarial.shape} does not match clean {clean.shape}")
    if len(adversarial) > len(clean):
        raise ValueError(f"{len(adversarial)} adversarial images for {len(clean)} clean ones")
    return clean[: len(adversarial)], adversarial


def perturbation_norms(purifier, clean, adversarial, batch_size=32, purified_clean=None):
    """Per example, the norms of δ and of the perturbation the purifier passes on.

    Args:
      purifier: callable mapping float32 [B, H, W, C] images in [0, 1] to
        images in [0, 1] units (e.g. `s2s_model.build_purifier`).
      clean: [N, H, W, C] clean images x.
      adversarial: [n, H, W, C] adversarial images x + δ of clean[:n], n <= N
        (a threat model may attack only the first n examples).
      batch_size: images per compiled forward pass.
      purified_clean: P(clean), if already computed (at least n rows).

    Returns:
      {"input_l2", "input_linf", "passed_l2", "passed_linf"}: [n] float64 numpy
      arrays of ||δ|| and ||P(x + δ) - P(x)||.

    Raises:
      ValueError: for mismatched shapes.
    """
    clean, adversarial = _paired(clean, adversarial)
    if purified_clean is None:
        purified_clean = _purify(purifier, clean, batch_size)
    passed = _purify(purifier, adversarial, batch_size) - purified_clean[: len(adversarial)]
    inputs, outputs = _flat_norms(adversarial - clean), _flat_norms(passed)
    return {
        **{f"input_{k}": v for k, v in inputs.items()},
        **{f"passed_{k}": v for k, v in outputs.items()},
    }


def _location(values, **bootstrap_args):
    return {
        "median": stats.bootstrap(stats.median_statistic, values, **bootstrap_args),
        "mean": stats.bootstrap(stats.mean_statistic, values, **bootstrap_args),
    }


def summarize_norms(norms, num_resamples=1000, seed=0, confidence=0.95):
    """Medians, means and passed-on / input ratios of `perturbation_norms`, with intervals.

    Args:
      norms: a dict from `perturbation_norms`.
      num_resamples, seed, confidence: of the bootstrap intervals.

    Returns:
      A JSON-serialisable dict: "num_examples", "num_perturbed" (examples with
      δ != 0) and, for "l2" and "linf", {"input": {"median", "mean"},
      "passed_on": {"median", "mean"}, "ratio": {"median", "mean", "of_means"}},
      each {"estimate", "interval": [low, high]}. "ratio" holds per-example
      ||P(x+δ) - P(x)|| / ||δ|| (median, mean) and sum ||P(x+δ) - P(x)|| /
      sum ||δ|| (of_means), over perturbed examples only; it is None when no
      example was perturbed. Input and passed-on norms cover every example.
    """
    bootstrap_args = {"num_resamples": num_resamples, "seed": seed, "confidence": confidence}
    moved = norms["input_l2"] > 0
    summary = {"num_examples": int(len(moved)), "num_perturbed": int(moved.sum())}
    for norm in NORMS:
        inputs, passed = norms[f"input_{norm}"], norms[f"passed_{norm}"]
        entry = {
            "input": _location(inputs, **bootstrap_args) if len(inputs) else None,
            "passed_on": _location(passed, **bootstrap_args) if len(passed) else None,
            "ratio": None,
        }
        if moved.any():
            entry["ratio"] = _location(passed[moved] / inputs[moved], **bootstrap_args)
            entry["ratio"]["of_means"] = stats.bootstrap(
                stats.ratio_of_means, passed[moved], inputs[moved], **bootstrap_args
            )
        summary[norm] = entry
    return summary


def effective_perturbations(purifier, clean, runs, batch_size=32, **bootstrap_args):
    """Norms and summaries of the passed-on perturbation for several attack runs.

    Args:
      purifier: callable mapping [0, 1] images to [0, 1] images.
      clean: [N, H, W, C] clean images.
      runs: {key: [n, H, W, C] adversarial images of clean[:n]}, e.g. keyed
        "white_box/pgd/8/255" (threat model / attack / eps).
      batch_size: images per compiled forward pass.
      **bootstrap_args: num_resamples, seed, confidence (see `summarize_norms`).

    Returns:
      {"summary": {key: `summarize_norms` dict} (JSON-serialisable),
      "norms": {key: `perturbation_norms` dict} (numpy, for `plot_norm_scatter`)}.
    """
    clean = np.asarray(clean, np.float32)
    longest = max((len(adv) for adv in runs.values()), default=0)
    # P(x) once for every run: runs share the clean images.
    purified_clean = _purify(purifier, clean[:longest], batch_size) if longest else None
    norms = {
        key: perturbation_norms(purifier, clean, adv, batch_size, purified_clean)
        for key, adv in runs.items()
    }
    return {
        "summary": {key: summarize_norms(n, **bootstrap_args) for key, n in norms.items()},
        "norms": norms,
    }


def _show(ax, image):
    image = np.clip(image, 0.0, 1.0)
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
    else:
        ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_effective_examples(purifier, clean, adversarial, path, num_examples=4):
    """A PNG grid: rows x, δ and P(x + δ) - P(x), one column per example.

    δ and the passed-on perturbation are drawn on one shared scale (grey = 0,
    the largest |value| of either row at full contrast), so their sizes compare
    directly; neither row saturates.

    Args:
      purifier: callable mapping [0, 1] images to [0, 1] images.
      clean: [N, H, W, C] clean images.
      adversarial: [n, H, W, C] adversarial images of clean[:n].
      path: the PNG file to write.
      num_examples: columns (the first examples).

    Returns:
      path.
    """
    clean, adversarial = _paired(clean, adversarial)
    clean, adversarial = clean[:num_examples], adversarial[:num_examples]
    if not len(clean):
        raise ValueError("no examples to plot")
    delta = adversarial - clean
    passed = _purify(purifier, adversarial, num_examples) - _purify(purifier, clean, num_examples)
    scale = max(float(np.abs(delta).max()), float(np.abs(passed).max()), 1e-12)
    rows = {
        "x": clean,
        "δ": 0.5 + delta / (2 * scale),
        "P(x+δ) − P(x)": 0.5 + passed / (2 * scale),
    }
    cols = len(clean)
    fig, axes = plt.subplots(3, cols, figsize=(1.8 * cols, 5.8), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(cols):
            _show(axes[r][c], images[c])
        axes[r][0].set_ylabel(name, fontsize=8)
    fig.suptitle(f"perturbations shown as 0.5 + d / (2 × {scale:.3g})", fontsize=8)
    return report.save_figure(fig, path)


def plot_norm_scatter(norms_by_run, path):
    """A PNG scatter of ||P(x + δ) - P(x)||_2 against ||δ||_2, one colour per run.

    Args:
      norms_by_run: {key: `perturbation_norms` dict}, e.g. the "norms" of
        `effective_perturbations`.
      path: the PNG file to write.

    Returns:
      path.
    """
    fig, ax = plt.subplots(figsize=(5, 5))
    top = 0.0
    for key, norms in norms_by_run.items():
        ax.scatter(norms["input_l2"], norms["passed_l2"], s=8, alpha=0.6, label=key)
        top = max(top, float(np.max(norms["input_l2"], initial=0.0)))
        top = max(top, float(np.max(norms["passed_l2"], initial=0.0)))
    top = top or 1.0
    # Points below the diagonal: the purifier passes on less than the attack put in.
    ax.plot([0, top], [0, top], "k--", linewidth=0.8, label="passed on = input")
    ax.set_xlabel("||δ||₂")
    ax.set_ylabel("||P(x+δ) − P(x)||₂")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return report.save_figure(fig, path)
