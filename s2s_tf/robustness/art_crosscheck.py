"""A second opinion from another attack library: ART's attacks on an exported defended model.

The project's own evaluation (`evaluation.Evaluator`) sets the headline; this
module checks it from outside, as an independent evaluator would, with the
Adversarial Robustness Toolbox (ART; Nicolae et al. 2018). It uses nothing of
the project's model code: it loads the exported SavedModel, wraps views of its
serving signatures as ART estimators and runs ART's attacks, each on the
examples every earlier run left robust (a cascade, as AutoAttack runs its
ensemble), scoring every adversarial image on `serving_default`:

- `white_box`: the gradient of `serving_default` itself (through the
  autoencoder's hard pooling switches, the gradient the project's report calls
  masked);
- `bpda`: the backward pass of `classify_undefended` at `purify(x)` with the
  autoencoder taken as the identity (Athalye et al. 2018); its forward pass is
  `classify_undefended(purify(x))`, which equals `serving_default(x)`;
- `gray_box`: the attack sees `classify_undefended` only (the classifier
  without the autoencoder);
- `square`: ART's Square attack (queries only) on `serving_default`, on what
  every gradient attack left robust.

The gradient attacks are ART's APGD with the cross-entropy and the DLR loss.
The project's soft-routing surrogate has no counterpart outside the project,
so a project worst case *below* ART's is expected; one above it by more than
`tolerance` means the project's evaluation missed what another library finds
(`compare`).
"""

import dataclasses
import json
import time

import numpy as np
import tensorflow as tf

from s2s_tf.export import signatures

THREAT_MODELS = ("white_box", "bpda", "gray_box")
APGD_LOSSES = {"apgd_ce": "cross_entropy", "apgd_dlr": "difference_logits_ratio"}
# ART's APGD starts with a step of 2 eps (Croce & Hein 2020) and halves it on its own schedule.
APGD_STEP_FACTOR = 2.0


@dataclasses.dataclass(frozen=True)
class CrossCheckConfig:
    """What the cross-check runs.

    Attributes:
      eps: L-inf budget in [0, 1] pixel units.
      steps: APGD iterations.
      square_queries: Square's iterations (one query each); 0: no Square.
      attacks: APGD variants, keys of `APGD_LOSSES`.
      threat_models: gradient views, from `THREAT_MODELS`.
      batch_size: examples per ART call.
      seed: seeds numpy's and TensorFlow's global generators (ART draws from them).
    """

    eps: float
    steps: int = 100
    square_queries: int = 5000
    attacks: tuple = tuple(APGD_LOSSES)
    threat_models: tuple = THREAT_MODELS
    batch_size: int = 100
    seed: int = 0

    def validate(self):
        """Raises ValueError naming the first invalid field."""
        if not 0.0 < self.eps <= 1.0:
            raise ValueError(f"eps must be in (0, 1] pixel units, got {self.eps}")
        if self.steps < 1 or self.batch_size < 1 or self.square_queries < 0:
            raise ValueError("steps and batch_size must be >= 1, square_queries >= 0")
        for attack in self.attacks:
            if attack not in APGD_LOSSES:
                raise ValueError(f"unknown attack {attack!r}; choose from {tuple(APGD_LOSSES)}")
        for threat in self.threat_models:
            if threat not in THREAT_MODELS:
                raise ValueError(f"unknown threat model {threat!r}; choose from {THREAT_MODELS}")


def export_views(export_dir):
    """The exported model's logits functions, as ART calls them (`fn(x, training=False)`).

    Returns:
      A dict with "defended" (`serving_default`), "undefended"
      (`classify_undefended`) and "bpda" (see the module docstring).

    Raises:
      ValueError: when the SavedModel lacks one of the signatures used.
    """
    loaded = tf.saved_model.load(export_dir)
    names = (
        signatures.DEFAULT_SIGNATURE,
        signatures.UNDEFENDED_SIGNATURE,
        signatures.PURIFY_SIGNATURE,
    )
    missing = [name for name in names if name not in loaded.signatures]
    if missing:
        raise ValueError(f"{export_dir} has no signature {missing}: not an s2s_tf export")
    images = signatures.IMAGES_INPUT

    def call(name, x):  # through `loaded`, which keeps the signatures' variables alive
        return loaded.signatures[name](**{images: x})

    @tf.custom_gradient
    def identity_backward(x):
        def grad(upstream, variables=None):  # the autoencoder's weights get no gradient
            return upstream, [None] * len(variables or ())

        return call(signatures.PURIFY_SIGNATURE, x)[signatures.PURIFIED_OUTPUT], grad

    def view(fn):
        def logits(x, training=False):
            del training  # a SavedModel signature has one mode
            return fn(tf.convert_to_tensor(x, tf.float32))

        return logits

    undefended = signatures.UNDEFENDED_SIGNATURE
    return {
        "defended": view(lambda x: call(signatures.DEFAULT_SIGNATURE, x)["logits"]),
        "undefended": view(lambda x: call(undefended, x)["logits"]),
        "bpda": view(lambda x: call(undefended, identity_backward(x))["logits"]),
    }


def _estimator(fn, num_classes, input_shape):
    from art.estimators.classification import TensorFlowV2Classifier  # noqa: PLC0415

    return TensorFlowV2Classifier(
        model=fn,
        nb_classes=num_classes,
        input_shape=tuple(input_shape),
        loss_object=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        clip_values=(0.0, 1.0),
    )


def _check_budget(name, x, adv, eps):
    """Raises when an attack's images leave the eps ball or [0, 1] (an attack bug, not a result)."""
    size = float(np.max(np.abs(adv - x))) if len(x) else 0.0
    if size > eps + 1e-5 or adv.min(initial=0.0) < -1e-6 or adv.max(initial=1.0) > 1 + 1e-6:
        raise RuntimeError(f"{name}: adversarial images break the budget (L-inf {size} > {eps})")


def clean_correct(views, images, labels, batch_size=100):
    """bool [n]: whether `serving_default` classifies each image correctly.

    Args:
      views: `export_views`' dict.
      images: float32 [n, H, W, 3] in [0, 1].
      labels: int [n].
      batch_size: images per call.
    """
    images = np.asarray(images, np.float32)
    logits = [
        views["defended"](images[start : start + batch_size]).numpy()
        for start in range(0, len(images), batch_size)
    ]
    predicted = np.concatenate(logits).argmax(-1) if logits else np.zeros([0], np.int64)
    return predicted == np.asarray(labels).astype(np.int64)


def run(export, images, labels, config, progress=lambda message: None, clean=None):
    """ART's attacks on the export, a cascade over `config`'s runs.

    Args:
      export: an s2s_tf SavedModel version folder, or `export_views`' dict of
        one (load it once to check several budgets).
      images: float32 [n, H, W, 3] in [0, 1].
      labels: int [n].
      config: `CrossCheckConfig`.
      progress: callable(str) told about each run as it ends.
      clean: `clean_correct(views, images, labels)` when already computed (it
        does not depend on eps); None: computed here.

    Returns:
      A dict: "clean" and "robust" (bool lists [n]: correct clean, and correct
      after every run), "robust_accuracy", "n", and "runs", one row per run in
      order: {"run", "attacked", "fooled", "seconds"}.
    """
    from art.attacks.evasion import AutoProjectedGradientDescent  # noqa: PLC0415
    from art.attacks.evasion import SquareAttack  # noqa: PLC0415

    config.validate()
    np.random.seed(config.seed)
    tf.random.set_seed(config.seed)
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels).astype(np.int64)
    views = export if isinstance(export, dict) else export_views(export)
    num_classes = int(views["defended"](images[:1]).shape[-1])
    estimators = {
        name: _estimator(views[name], num_classes, images.shape[1:])
        for name in ("defended", "undefended", "bpda")
    }
    gradient_of = {"white_box": "defended", "bpda": "bpda", "gray_box": "undefended"}

    if clean is None:
        clean = clean_correct(views, images, labels, config.batch_size)
    clean = np.asarray(clean, bool)
    if clean.shape != labels.shape:
        raise ValueError(f"clean covers {clean.shape[0]} examples, labels {labels.shape[0]}")
    robust = clean.copy()
    plan = [
        (
            f"{threat}/{attack}",
            lambda threat=threat, attack=attack: AutoProjectedGradientDescent(
                estimators[gradient_of[threat]],
                norm=np.inf,
                eps=config.eps,
                eps_step=APGD_STEP_FACTOR * config.eps,
                max_iter=config.steps,
                targeted=False,
                nb_random_init=1,
                batch_size=config.batch_size,
                loss_type=APGD_LOSSES[attack],
                verbose=False,
            ),
        )
        for threat in config.threat_models
        for attack in config.attacks
    ]
    if config.square_queries:
        plan.append(
            (
                "gradient_free/square",
                lambda: SquareAttack(
                    estimators["defended"],
                    norm=np.inf,
                    eps=config.eps,
                    max_iter=config.square_queries,
                    nb_restarts=1,
                    batch_size=config.batch_size,
                    verbose=False,
                ),
            )
        )
    rows = []
    for name, make in plan:
        index = np.flatnonzero(robust)
        started = time.perf_counter()
        fooled = 0
        if len(index):
            x = images[index]
            one_hot = np.eye(num_classes, dtype=np.float32)[labels[index]]
            adv = make().generate(x, y=one_hot).astype(np.float32)
            _check_budget(name, x, adv, config.eps)
            predicted = estimators["defended"].predict(adv, batch_size=config.batch_size)
            still = predicted.argmax(-1) == labels[index]
            fooled = int((~still).sum())
            robust[index[~still]] = False
        rows.append(
            {
                "run": name,
                "attacked": len(index),
                "fooled": fooled,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        progress(f"ART {name}: fooled {fooled} of {len(index)} ({rows[-1]['seconds']} s)")
    n = len(labels)
    return {
        "eps": config.eps,
        "n": n,
        "clean": clean.tolist(),
        "robust": robust.tolist(),
        "robust_accuracy": float(robust.sum()) / n if n else 0.0,
        "runs": rows,
    }


def compare(ours, theirs, tolerance=0.01):
    """The project's per-example worst case against another library's on the same examples.

    Args:
      ours: bool [n], robust under the project's evaluation.
      theirs: bool [n], robust under the other library's attacks.
      tolerance: how far above theirs our robust accuracy may be.

    Returns:
      A dict: "ours", "theirs" (robust accuracies), "passed" (ours <= theirs +
      tolerance), "missed" (indices the other library fooled and ours counts
      robust: the examples our evaluation should have broken), "n".

    Raises:
      ValueError: when the two cover different numbers of examples.
    """
    ours, theirs = np.asarray(ours, bool), np.asarray(theirs, bool)
    if ours.shape != theirs.shape:
        raise ValueError(f"different examples: {ours.shape[0]} ours, {theirs.shape[0]} theirs")
    n = len(ours)
    ours_rate, theirs_rate = ours.mean() if n else 0.0, theirs.mean() if n else 0.0
    return {
        "n": n,
        "ours": float(ours_rate),
        "theirs": float(theirs_rate),
        "tolerance": tolerance,
        "passed": bool(ours_rate <= theirs_rate + tolerance + 1e-12),
        "missed": np.flatnonzero(ours & ~theirs).tolist(),
    }


def write_json(document, path):
    """Writes `document` as indented JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=1)
