"""The paper's claims 2 to 5 on an evaluation's models and examples, for the report.

- Claim 2 (gradients): `counterfactual.counterfactual_analysis` on the
  classifier alone, the stage-1 autoencoder + classifier (reconstruction only,
  when its autoencoder is given) and the stage-2 S2SNet, on the same images.
- Claim 3 (effective perturbations): `effective.effective_perturbations` for the
  adversarial examples of each gradient threat model at each eps: how much of
  the perturbation the S2SNet passes on to the classifier.
- Claim 4 (white-box resilience, beside baselines): each input-transformation
  baseline in front of the same classifier, evaluated on the same split with
  the S2SNet's attack settings by the same engine (`baselines_claim`).
- Claim 5 (relations): `relations.summarize` of the transfer matrices, each
  defended model's own row remade through its soft-routing surrogate
  (`relations_claim`).
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf
from absl import logging

from s2s_tf.analysis import baselines
from s2s_tf.analysis import counterfactual
from s2s_tf.analysis import effective
from s2s_tf.analysis import relations
from s2s_tf.models import s2s_model
from s2s_tf.robustness import evaluation
from s2s_tf.robustness import streaming
from s2s_tf.robustness import threat_models

# The threat models whose adversarial examples the effective-perturbation analysis reads.
EFFECTIVE_THREATS = ("gray_box", "white_box", "bpda", "surrogate")


def gradient_claims(models, images, reconstruction_autoencoder=None, top_k=3, batch_size=32):
    """Claim 2 on `images`: the counterfactual analysis, or None with fewer than 2 classes.

    Args:
      models: the evaluation's `threat_models.Models`.
      images: [N, H, W, C] in [0, 1] (use >= 256 for a test of the claim).
      reconstruction_autoencoder: the stage-1 autoencoder (Keras model), for the
        reconstruction-only counterfactual; None leaves it out.
      top_k: classes compared per image (at most the classifier's classes).
      batch_size: images per compiled gradient computation.

    Returns:
      `counterfactual.counterfactual_analysis`'s dict, or None.
    """
    num_classes = int(models.classifier(images[:1]).shape[-1])
    top_k = min(top_k, num_classes)
    if top_k < 2:
        return None
    named = {"classifier": models.classifier, "s2s": models.defended}
    if reconstruction_autoencoder is not None:
        named["reconstruction"] = s2s_model.build_s2s_model(
            reconstruction_autoencoder, models.classifier, images.shape[1:]
        )
    return counterfactual.counterfactual_analysis(
        named, images, subject="s2s", reference="classifier", top_k=top_k, batch_size=batch_size
    )


def effective_runs(evaluator, threats=EFFECTIVE_THREATS, num_examples=64):
    """Adversarial examples of the first `num_examples` for each gradient threat model and eps.

    The first examples are attacked here with the check attack, whatever the
    evaluation kept: its runs attack only the examples each must see (clean-
    correct ones, or those a cascade left), so its kept images need not be the
    first ones. The random starts are seeded per example, so these are the
    examples the evaluation made for the examples it attacked.
    """
    config, models = evaluator.config, evaluator.models
    images = evaluator.images[:num_examples]
    runs = {}
    for threat_name in [t for t in threats if t in config.threat_models]:
        threat = evaluation.threat_models.get(threat_name)
        source = threat.attacker(models, config)
        for eps in config.eps:
            key = evaluation.run_key(threat_name, config.check_attack, eps)
            runs[key] = evaluator.attack(config.check_attack, source, eps, images)
    return runs


def effective_claim(evaluator, purifier, outdir, num_examples=64):
    """Claim 3: summaries per run, and the plots written to `outdir`; returns (summary, files)."""
    runs = effective_runs(evaluator, num_examples=num_examples)
    if not runs:
        return {}, {}
    clean = evaluator.images[:num_examples]
    result = effective.effective_perturbations(purifier, clean, runs)
    strongest = max(runs, key=lambda k: (k.startswith("white_box/"), _eps_of(k)))
    files = {
        "effective_examples_plot": effective.plot_effective_examples(
            purifier, clean, runs[strongest], os.path.join(outdir, "effective_examples.png")
        ),
        "effective_scatter_plot": effective.plot_norm_scatter(
            result["norms"], os.path.join(outdir, "effective_norms.png")
        ),
    }
    return result["summary"], files


def _eps_of(key):
    numerator = key.rsplit("/", 2)[-2]
    return float(numerator)


@dataclasses.dataclass
class OwnS2S:
    """A defended model of the transfer matrix with an S2SNet of its own, for its surrogate.

    Attributes:
      models: its `threat_models.Models` (its classifier, itself, its purifier),
        at the input size it takes.
      size: (H, W) of that input when it differs from the evaluation's images
        (they are resized in front of it, differentiably); None when equal.
    """

    models: threat_models.Models
    size: tuple | None = None


class _Resized:
    """`model_fn` on images resized (bilinear) to `size` first."""

    def __init__(self, model_fn, size):
        self.model_fn, self.size = model_fn, tuple(size)

    def __call__(self, x):
        return self.model_fn(tf.image.resize(x, self.size))


def _surrogate_sources(own, images, config):
    """{surrogate variant: model_fn on the evaluation's images} of one defended model."""
    if own.size is not None:
        images = tf.image.resize(images[: config.surrogate_calibration_examples], own.size)
    own.models.calibrate(np.asarray(images[: config.surrogate_calibration_examples]))
    sources = threat_models.get("surrogate").sources(own.models, config)
    if own.size is None:
        return sources
    return {variant: _Resized(fn, own.size) for variant, fn in sources.items()}


def relations_claim(evaluator, eps_keys, own=None, num_examples=200):
    """Claim 5: a transfer matrix on the first examples, each model attacked at its strongest.

    Each undefended model attacks itself with the transfer attack end to end;
    each defended model ("defended" and every "<name>+s2s") through each
    soft-routing surrogate temperature, an example counting as fooled on a
    target when any temperature fooled it there. Every source's examples are
    scored on every model, at the eps of the evaluation's transfer matrices.

    Args:
      evaluator: an `evaluation.Evaluator` holding the split's first examples.
      eps_keys: the eps keys of the evaluation's transfer matrices.
      own: {"<name>+s2s": `OwnS2S`} of the defended models besides "defended".
      num_examples: the first examples used.

    Returns:
      {} without eps keys; else `relations.summarize`'s dict plus "attack",
      "num_examples", "clean" ({model: accuracy on those examples}), "rows"
      ({eps key: {undefended source: {target: accuracy}}}) and
      "surrogate_rows" (the same for the defended sources).
    """
    if not eps_keys:
        return {}
    config, models = evaluator.config, evaluator.models
    images, labels = evaluator.images[:num_examples], evaluator.labels[:num_examples]
    named = {"classifier": models.classifier, "defended": models.defended, **models.others}
    defended = {"defended": OwnS2S(models), **(own or {})}
    sources = {name: {name: fn} for name, fn in named.items() if not relations.is_defended(name)}
    for name, own_s2s in defended.items():
        sources[name] = _surrogate_sources(own_s2s, evaluator.images, config)
    clean = {name: evaluator.accuracy(fn, images, labels) for name, fn in named.items()}
    attack, indices = config.transfer_attack, np.arange(len(images))
    rows = {"rows": {}, "surrogate_rows": {}}
    for key in eps_keys:
        for name, variants in sources.items():
            worst = None
            for variant, source in variants.items():
                evaluator.progress(f"relations: {attack} on {name} through {variant}, {key}")
                run = f"relations/{attack}@{name}~{variant}/{key}"
                eps = relations.eps_value(key)
                correct = evaluator.run_attack(run, attack, source, eps, indices, named)
                worst = correct if worst is None else {t: worst[t] & correct[t] for t in correct}
            table = rows["surrogate_rows" if relations.is_defended(name) else "rows"]
            table.setdefault(key, {})[name] = {t: float(np.mean(c)) for t, c in worst.items()}
    summary = relations.summarize(rows["rows"], clean, rows["surrogate_rows"])
    return {"attack": attack, "num_examples": len(images), "clean": clean, **rows, **summary}


def baselines_claim(names, classifier, data, config, shard_dir, model_key="", **stream_args):
    """Claim 4's baselines, each evaluated on the split like the S2SNet (`streaming`).

    Args:
      names: keys of `baselines.BASELINES`.
      classifier: the S2SNet's classifier.
      data: the split's `data.DataConfig` (as the S2SNet's evaluation reads it).
      config: the S2SNet's `evaluation.EvalConfig`.
      shard_dir: the S2SNet's shard folder; each baseline's shards go in a
        subfolder, under a model key of its own, so they never mix.
      model_key: the S2SNet's model key.
      **stream_args: `stream`, `worker`, `strategy`, `progress` of
        `streaming.evaluate_split`.

    Returns:
      {name: `baselines.summary`'s dict}; {} on workers other than 0.
    """
    out = {}
    progress = stream_args.pop("progress", logging.info)
    for name in names:
        models, baseline_config = baselines.setup(name, classifier, config)
        results = streaming.evaluate_split(
            models,
            data,
            baseline_config,
            os.path.join(shard_dir, f"baseline_{name}"),
            model_key=f"{model_key}/baseline:{name}",
            progress=lambda line, name=name: progress(f"baseline {name}: {line}"),
            **stream_args,
        )
        if results is not None:
            out[name] = baselines.summary(name, baseline_config, results)
    return out
