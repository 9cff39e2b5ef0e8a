"""Counterfactual test of the paper's claim 2: do S2SNet gradients lose class signal?

Folz et al. claim that an S2SNet's input gradients carry less class-dependent
signal and follow low-level structure (edges). Comparing the S2SNet with the
classifier alone cannot separate the stage-2 training from the mere presence of
an autoencoder, so the claim is tested against every counterfactual given: the
classifier alone and the stage-1 autoencoder + classifier (reconstruction only).
Every model sees the same images, and the class gradients of every model are
taken for the same classes (the reference model's top-k per image), so a
difference between models cannot come from comparing different classes.

Class specificity is the share of the class logits' gradient energy that is
class-dependent: per image, sum_k ||g_k - g_bar||^2 / sum_k ||g_k||^2 over the
K shared classes, g_k the input gradient of logit k and g_bar their mean
(0: every class logit pulls the input the same way; (K-1)/K for orthogonal
gradients of equal norm; 1 when they cancel on average). For gradients
g_k = s + eps * r_k it grows with eps, so it can find a model more or less
class-specific than another. The mean cosine between gradients of centred
logits z_k - mean_j z_j cannot: centring removes the shared part s, which
leaves the same value (about -1/(C-1)) whatever eps is.
Structure alignment is the correlation of |gradient| with the Sobel edge
magnitude, averaged over the same classes, of the centred-logit gradients (the
part of each class gradient that can change a prediction).

Each statistic gets a seeded percentile-bootstrap interval over images, and the
subject's paired difference to each counterfactual gets one too. The verdict
follows from those intervals alone (`claim_verdict`). The intervals cover the
sampling of images for fixed weights only: two autoencoders trained from
different seeds can differ too, which these intervals do not include. The
gradient statistics themselves come from `gradient_analysis`.
"""

import numpy as np
import tensorflow as tf

from s2s_tf.analysis import gradient_analysis as ga
from s2s_tf.robustness import stats

SUPPORTED = "supported"
CONTRADICTED = "contradicted"
NOT_SUPPORTED = "not supported by these data (interval includes 0)"

# Claims tested: key -> (statistic's description, the claimed sign of subject - counterfactual).
CLAIMS = {
    "class_dependent_share": (
        "the S2SNet's input gradients carry less class-dependent signal "
        "(a lower share of the class-logit gradients' energy in their class-dependent part)",
        -1,
    ),
    "structure_alignment": (
        "the S2SNet's input gradients follow low-level structure "
        "(higher correlation of |gradient| with the Sobel edge magnitude)",
        +1,
    ),
}


def claim_verdict(intervals, direction):
    """The status of a claim from intervals of subject - counterfactual differences.

    Args:
      intervals: {counterfactual name: (low, high)} of the subject's difference.
      direction: +1 if the claim says the subject is higher, -1 if lower.

    Returns:
      `SUPPORTED` when every interval excludes 0 in the claimed direction,
      `CONTRADICTED` when any excludes 0 in the opposite direction, else
      `NOT_SUPPORTED`.

    Raises:
      ValueError: for no intervals or a direction other than +1 / -1.
    """
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction}")
    if not intervals:
        raise ValueError("a claim needs at least one counterfactual")
    signed = [sorted((direction * low, direction * high)) for low, high in intervals.values()]
    if any(high < 0 for _, high in signed):
        return CONTRADICTED
    if all(low > 0 for low, _ in signed):
        return SUPPORTED
    return NOT_SUPPORTED


def evaluate_claim(per_image, subject, statement, direction, **bootstrap_args):
    """Intervals per model, paired differences and the verdict of one claim.

    Args:
      per_image: {model name: [N] per-image statistic}, the same images for all.
      subject: the model the claim is about; all others are its counterfactuals.
      statement: what the claim says, for the verdict sentence.
      direction: +1 if the claim says the subject's statistic is higher, -1 if lower.
      **bootstrap_args: num_resamples, seed, confidence (see `stats.bootstrap`).

    Returns:
      {"statement", "direction": "higher" | "lower", "models": {name: {"estimate",
      "interval"}}, "differences": {"<subject> - <name>": {"estimate", "interval"}},
      "status": one of SUPPORTED / CONTRADICTED / NOT_SUPPORTED, "verdict": one sentence}.

    Raises:
      ValueError: when the subject is missing or has no counterfactual.
    """
    if subject not in per_image or len(per_image) < 2:
        raise ValueError(f"need {subject!r} and a counterfactual, got {sorted(per_image)}")
    values = {name: np.asarray(v, np.float64) for name, v in per_image.items()}
    models = {
        name: stats.bootstrap(stats.mean_statistic, v, **bootstrap_args)
        for name, v in values.items()
    }
    differences = {
        f"{subject} - {name}": stats.bootstrap(
            stats.mean_statistic, values[subject] - v, **bootstrap_args
        )
        for name, v in values.items()
        if name != subject
    }
    status = claim_verdict({k: d["interval"] for k, d in differences.items()}, direction)
    details = "; ".join(
        f"{key} = {d['estimate']:+.4f} [{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}]"
        for key, d in differences.items()
    )
    return {
        "statement": statement,
        "direction": "higher" if direction > 0 else "lower",
        "models": models,
        "differences": differences,
        "status": status,
        "verdict": f"That {statement} is {status}: {details} (mean over images, bootstrap CI).",
    }


def _with_mean_logit(model_fn):
    """A model_fn returning the logits of `model_fn` with their mean appended as a last column."""

    def augmented(x):
        logits = tf.cast(model_fn(x), tf.float32)
        return tf.concat([logits, tf.reduce_mean(logits, axis=-1, keepdims=True)], axis=-1)

    return augmented


def class_gradients(model_fn, images, classes, batch_size=32, augmented=None):
    """Input gradients of the given class logits, raw and centred.

    The centred logit z_c - mean_j z_j costs one backward pass more than the raw
    ones: its gradient is g_c minus the gradient of the mean logit.

    Args:
      model_fn: callable mapping float32 [B, H, W, C] images in [0, 1] to logits.
      images: [N, H, W, C] images.
      classes: [N, K] class indices.
      batch_size: images per compiled gradient computation.
      augmented: `_with_mean_logit(model_fn)` when the caller keeps one (so
        the compiled gradient function is traced once); None builds it.

    Returns:
      (raw, centred), each [N, K, H, W, C] float32: entry [i, k] of raw is
      d z[classes[i, k]] / d images[i], of centred d (z[classes[i, k]] -
      mean_j z[j]) / d images[i].
    """
    classes = np.asarray(classes, np.int32)
    num_classes = ga.predict_logits(model_fn, images[:1]).shape[-1]
    mean_column = np.full((len(classes), 1), num_classes, np.int32)
    grads = ga.class_logit_gradients(
        augmented or _with_mean_logit(model_fn),
        images,
        classes=np.concatenate([classes, mean_column], axis=1),
        batch_size=batch_size,
    )
    raw = grads[:, :-1]
    return raw, raw - grads[:, -1:]


def class_dependent_share(grads_per_class):
    """Per image, the share of gradient energy in the class-dependent part.

    sum_k ||g_k - g_bar||^2 / sum_k ||g_k||^2, with g_bar the mean of the K
    gradients of one image: 0 when every class gradient is the same, (K-1)/K
    for orthogonal gradients of equal norm, 1 when they cancel on average.

    Args:
      grads_per_class: [N, K, ...] gradients of K >= 2 class logits per image.

    Returns:
      [N] float64 numpy array.

    Raises:
      ValueError: for fewer than two classes, or an image whose class
        gradients are all zero (the share is undefined there; a gradient that
        vanishes is no evidence of class-agnostic gradients).
    """
    grads = np.asarray(grads_per_class, np.float64)
    if grads.ndim < 3 or grads.shape[1] < 2:
        raise ValueError(f"need [N, K>=2, ...] gradients, got shape {grads.shape}")
    flat = grads.reshape(grads.shape[0], grads.shape[1], -1)
    total = np.sum(flat**2, axis=(1, 2))
    zero = np.flatnonzero(total == 0)
    if zero.size:
        raise ValueError(f"the class gradients of images {zero.tolist()} are all zero")
    centred = flat - flat.mean(axis=1, keepdims=True)
    return np.sum(centred**2, axis=(1, 2)) / total


def _per_image_statistics(model_fn, images, classes, batch_size):
    """Per-image class-dependent share and structure alignment on the given classes."""
    # One wrapper for all chunks, so the compiled gradient function is traced once.
    augmented = _with_mean_logit(model_fn)
    share, alignment = [], []
    for start in range(0, len(images), batch_size):
        chunk = slice(start, start + batch_size)
        raw, centred = class_gradients(
            model_fn, images[chunk], classes[chunk], batch_size, augmented
        )
        share.extend(class_dependent_share(raw).tolist())
        per_class = [
            ga.structure_alignment(centred[:, k], images[chunk])["per_image"]
            for k in range(centred.shape[1])
        ]
        alignment.extend(np.mean(per_class, axis=0).tolist())
    return {"class_dependent_share": share, "structure_alignment": alignment}


def _check_models(models, images, subject, reference, top_k):
    """Validates the model names and top_k against the models' logits."""
    for role, name in (("subject", subject), ("reference", reference)):
        if name not in models:
            raise ValueError(f"{role} {name!r} is not among the models {sorted(models)}")
    if len(models) < 2:
        raise ValueError("a counterfactual analysis needs at least two models")
    widths = {name: ga.predict_logits(fn, images[:1]).shape[-1] for name, fn in models.items()}
    if len(set(widths.values())) != 1:
        raise ValueError(f"the models disagree on the number of classes: {widths}")
    num_classes = widths[reference]
    if not 2 <= top_k <= num_classes:
        raise ValueError(f"top_k must be in [2, {num_classes}], got {top_k}")


def counterfactual_analysis(
    models,
    images,
    subject="s2s",
    reference="classifier",
    top_k=3,
    batch_size=32,
    num_resamples=1000,
    seed=0,
    confidence=0.95,
):
    """Tests claim 2 (class-agnostic, structure-following gradients) against counterfactuals.

    Args:
      models: {name: model_fn}, each mapping float32 [B, H, W, C] images in
        [0, 1] to logits over the same classes, e.g. {"classifier": c,
        "reconstruction": stage-1 AE + c, "s2s": stage-2 S2SNet}.
      images: [N, H, W, C] float32 images in [0, 1] (>= 256 for a real test).
      subject: the model the claim is about; every other model is a counterfactual.
      reference: the model whose top-k classes per image are the class set of
        every model (the classifier alone).
      top_k: classes compared per image, 2 <= top_k <= number of classes.
      batch_size: images per compiled gradient computation.
      num_resamples, seed, confidence: of the bootstrap intervals.

    Returns:
      A JSON-serialisable dict: "num_images", "image_shape", "subject",
      "reference", "top_k", "classes" ([N][K] ints, shared by all models),
      "bootstrap" ({"num_resamples", "seed", "confidence"}), "per_image"
      ({statistic: {model: [N] floats}}) and "claims" ({statistic: the dict of
      `evaluate_claim`}) for "class_dependent_share" and "structure_alignment".

    Raises:
      ValueError: for images not [N, H, W, C], unknown subject / reference
        names, a single model, models with different numbers of classes, or
        top_k out of range.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    _check_models(models, images, subject, reference, top_k)
    classes = ga.top_k_classes(models[reference], images, top_k, batch_size)
    per_image = {key: {} for key in CLAIMS}
    for name, model_fn in models.items():
        for key, values in _per_image_statistics(model_fn, images, classes, batch_size).items():
            per_image[key][name] = values
    bootstrap_args = {"num_resamples": num_resamples, "seed": seed, "confidence": confidence}
    claims = {
        key: evaluate_claim(per_image[key], subject, statement, direction, **bootstrap_args)
        for key, (statement, direction) in CLAIMS.items()
    }
    return {
        "num_images": len(images),
        "image_shape": list(images.shape[1:]),
        "subject": subject,
        "reference": reference,
        "top_k": top_k,
        "classes": classes.tolist(),
        "bootstrap": bootstrap_args,
        "per_image": per_image,
        "claims": claims,
    }
