"""The paper's claims 2 and 3 on an evaluation's models and examples, for the report.

- Claim 2 (gradients): `counterfactual.counterfactual_analysis` on the
  classifier alone, the stage-1 autoencoder + classifier (reconstruction only,
  when its autoencoder is given) and the stage-2 S2SNet, on the same images.
- Claim 3 (effective perturbations): `effective.effective_perturbations` for the
  adversarial examples of each gradient threat model at each eps: how much of
  the perturbation the S2SNet passes on to the classifier.
"""

import os

from s2s_tf.analysis import counterfactual
from s2s_tf.analysis import effective
from s2s_tf.models import s2s_model
from s2s_tf.robustness import evaluation

# The threat models whose adversarial examples the effective-perturbation analysis reads.
EFFECTIVE_THREATS = ("gray_box", "white_box", "bpda", "surrogate")


def gradient_claims(models, images, reconstruction_autoencoder=None, top_k=3, batch_size=32):
    """Claim 2 on `images`: the counterfactual analysis, or None with fewer than 3 classes.

    Args:
      models: the evaluation's `threat_models.Models`.
      images: [N, H, W, C] in [0, 1] (use >= 256 for a test of the claim).
      reconstruction_autoencoder: the stage-1 autoencoder (Keras model), for the
        reconstruction-only counterfactual; None leaves it out.
      top_k: classes compared per image (fewer than the classifier's classes).
      batch_size: images per compiled gradient computation.

    Returns:
      `counterfactual.counterfactual_analysis`'s dict, or None.
    """
    num_classes = int(models.classifier(images[:1]).shape[-1])
    top_k = min(top_k, num_classes - 1)
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

    The evaluator's own adversarial examples are used where it kept them (runs
    in this process); otherwise the first examples are attacked again here with
    the check attack (its random starts are seeded per example, so these are the
    same examples a sharded run made).
    """
    config, models = evaluator.config, evaluator.models
    images = evaluator.images[:num_examples]
    runs = {}
    for threat_name in [t for t in threats if t in config.threat_models]:
        threat = evaluation.threat_models.get(threat_name)
        source = threat.attacker(models, config)
        for eps in config.eps:
            key = evaluation.run_key(threat_name, config.check_attack, eps)
            kept = evaluator.adversarial.get(key)
            if kept is None or len(kept) < len(images):
                kept = evaluator.attack(config.check_attack, source, eps, images)
            runs[key] = kept[: len(images)]
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
