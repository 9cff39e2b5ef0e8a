"""Input-transformation baseline defenses (the paper's claim 4), evaluated like the S2SNet.

The paper argues that an S2SNet keeps its white-box robustness close to its
gray-box robustness. That is only informative beside simple input
transformations put in front of the same classifier:

- "jpeg": JPEG re-encoding (Das et al. 2017; Guo et al. 2018) at quality
  `JPEG_QUALITY`;
- "bit_depth": bit-depth reduction to `BIT_DEPTH_BITS` bits per channel
  (Xu et al. 2018, feature squeezing);
- "median": `MEDIAN_SIZE` x `MEDIAN_SIZE` median smoothing (also feature
  squeezing), reflect-padded.

Each is a purifier P_b from [0, 1] images to [0, 1] images built from stock
TensorFlow ops, and C o P_b is evaluated by the same `evaluation.Evaluator`
with the same attack suite and per-example worst case as the S2SNet, through
the threat models that apply to it (`threat_models_for`): gray-box, BPDA
(identity backward), white-box where P_b has a useful gradient (the median,
not the rounding of bit depth and JPEG, whose gradient is zero or undefined),
and the gradient-free attacks. For bit depth and JPEG the defended model's own
backward pass is BPDA's too (forward exactly C(P(x))), so the checks that rerun
an attack end to end differentiate something. The soft-routing surrogate needs
an autoencoder and the transfer matrix is the S2SNet's, so neither runs for a
baseline.
"""

import dataclasses
from collections.abc import Callable

import tensorflow as tf
from absl import logging

from s2s_tf.robustness import evaluation
from s2s_tf.robustness import runner
from s2s_tf.robustness import threat_models

JPEG_QUALITY = 75
BIT_DEPTH_BITS = 4
MEDIAN_SIZE = 3


def jpeg_purifier(quality=JPEG_QUALITY):
    """P(x): each image JPEG-encoded at `quality` and decoded, in [0, 1] (not differentiable)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")

    def purify(x):
        x = tf.clip_by_value(tf.convert_to_tensor(x, tf.float32), 0.0, 1.0)
        return tf.map_fn(
            lambda image: tf.image.adjust_jpeg_quality(image, quality),
            x,
            fn_output_signature=tf.float32,
        )

    return purify


def bit_depth_purifier(bits=BIT_DEPTH_BITS):
    """P(x): every value rounded to the nearest of 2**bits levels in [0, 1] (gradient zero)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    levels = float(2**bits - 1)

    def purify(x):
        x = tf.clip_by_value(tf.convert_to_tensor(x, tf.float32), 0.0, 1.0)
        return tf.round(x * levels) / levels

    return purify


def median_purifier(size=MEDIAN_SIZE):
    """P(x): the median of each channel over a size x size window (reflect-padded).

    The median is the middle value of `tf.math.top_k` over the window, so the
    gradient flows to the pixel that is the median (useful, unlike rounding).
    """
    if size < 3 or size % 2 == 0:
        raise ValueError(f"the median window must be odd and >= 3, got {size}")
    pad, window = size // 2, size * size

    def purify(x):
        x = tf.convert_to_tensor(x, tf.float32)
        shape = tf.shape(x)
        padded = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        patches = tf.image.extract_patches(
            padded, [1, size, size, 1], [1, 1, 1, 1], [1, 1, 1, 1], "VALID"
        )
        # extract_patches flattens (row, column, channel); put the window last.
        patches = tf.reshape(patches, [shape[0], shape[1], shape[2], window, shape[3]])
        patches = tf.transpose(patches, [0, 1, 2, 4, 3])
        return tf.math.top_k(patches, k=window // 2 + 1).values[..., -1]

    return purify


@dataclasses.dataclass(frozen=True)
class Baseline:
    """One baseline defense.

    Attributes:
      name: the registry key (flags, JSON keys).
      title: one line for the report.
      build: () -> the purifier, a callable on [B, H, W, C] float32 in [0, 1].
      differentiable: whether the purifier's gradient is useful to an attacker
        (else the white-box threat model is BPDA).
    """

    name: str
    title: str
    build: Callable[[], Callable]
    differentiable: bool


BASELINES = {
    b.name: b
    for b in (
        Baseline("jpeg", f"JPEG re-encoding, quality {JPEG_QUALITY}", jpeg_purifier, False),
        Baseline(
            "bit_depth",
            f"bit-depth reduction to {BIT_DEPTH_BITS} bits",
            bit_depth_purifier,
            False,
        ),
        Baseline("median", f"{MEDIAN_SIZE}x{MEDIAN_SIZE} median smoothing", median_purifier, True),
    )
}

# Threat models that need an S2SNet (the surrogate) or run on the S2SNet's models (transfer).
_S2S_ONLY = ("surrogate", "transfer")


def get(name):
    """The `Baseline` called `name`; ValueError naming the known ones."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {sorted(BASELINES)}")
    return BASELINES[name]


def threat_models_for(baseline, threats):
    """The threat models of `threats` (in their order) that apply to `baseline`.

    The surrogate and the transfer matrix are left out. For a purifier without
    a useful gradient, the white-box threat model becomes BPDA, which stands
    where white-box stood (and runs once when both were asked for).
    """
    out = []
    for name in threats:
        if name in _S2S_ONLY:
            continue
        if name == "white_box" and not baseline.differentiable:
            name = "bpda"
        if name not in out:
            out.append(name)
    return tuple(out)


class _Composed:
    """C o P as a callable object (the attack caches are keyed on it, weakly)."""

    def __init__(self, classifier, purifier):
        self.classifier, self.purifier = classifier, purifier

    def __call__(self, x):
        return self.classifier(self.purifier(x))


def setup(name, classifier, config):
    """The models and attack settings of baseline `name` in front of `classifier`.

    Args:
      name: a key of `BASELINES`.
      classifier: the undefended classifier (model_fn on [0, 1] images).
      config: the S2SNet's `evaluation.EvalConfig`; only its threat models change.

    Returns:
      (`evaluation.Models`, `evaluation.EvalConfig`) for `evaluation.Evaluator`
      or `streaming.evaluate_split`.

    Raises:
      ValueError: for an unknown baseline, or when no threat model applies.
    """
    baseline = get(name)
    threats = threat_models_for(baseline, config.threat_models)
    if not any(threat_models.get(t).gradient for t in threats):
        raise ValueError(
            f"baseline {name!r}: none of the threat models {config.threat_models} attacks it "
            "with gradients (give gray_box, white_box or bpda)"
        )
    purifier = baseline.build()
    # Without a useful gradient of P, the end-to-end gradient an attacker takes is BPDA's:
    # the defended model is exactly C(P(x)) forward and passes the gradient through P.
    defended = (
        _Composed(classifier, purifier)
        if baseline.differentiable
        else runner.bpda_model_fn(purifier, classifier)
    )
    models = evaluation.Models(classifier=classifier, defended=defended, purifier=purifier)
    return models, dataclasses.replace(config, threat_models=threats)


def summary(name, config, results):
    """The report's entry of a baseline: what it is, the threat models run and the results."""
    baseline = get(name)
    return {
        "name": name,
        "title": baseline.title,
        "differentiable": baseline.differentiable,
        "threat_models": list(config.threat_models),
        "results": results,
    }


def evaluate(name, classifier, images, labels, config, progress=logging.info, sharded=None):
    """Evaluates baseline `name` on `images` in this process (see `setup`).

    Args:
      name: a key of `BASELINES`.
      classifier: the undefended classifier (model_fn on [0, 1] images).
      images: float32 [N, H, W, C] in [0, 1], the S2SNet's evaluation images.
      labels: int [N].
      config: the S2SNet's `evaluation.EvalConfig`.
      progress: callable(str) told about each unit of work.
      sharded: a `sharded.ShardedAttacks` of this baseline's own, or None.

    Returns:
      `summary`'s dict: "name", "title", "differentiable", "threat_models" (those
      run) and "results" (the `Evaluator`'s: clean accuracy, per-example runs,
      the worst-case headline).
    """
    models, config = setup(name, classifier, config)

    def tagged(message):
        progress(f"baseline {name}: {message}")

    evaluator = evaluation.Evaluator(models, images, labels, config, tagged, sharded)
    return summary(name, config, evaluator.run())
