"""Adversarial-space relations between models (the paper's claim 5), from transfer matrices.

The seed paper reports, over AlexNet, VGG16, ResNet50 and InceptionV3, that
VGG16 is the easiest to fool and that ResNet50's perturbations transfer best.
Given, at each eps, the matrix "accuracy of target t on examples made on
source s" and each model's clean accuracy, this module answers both questions
for any set of models:

- easiest to fool: the model whose own white-box attack (the diagonal) brings
  it lowest at the smallest eps, ties broken at the next eps;
- transfers best: the source whose examples lower the other models' accuracy
  most, as the mean drop from clean accuracy over the other targets.
"""


def _eps_value(key):
    numerator, _, denominator = key.partition("/")
    return float(numerator) / (float(denominator) if denominator else 1.0)


def summarize(matrices, clean):
    """The claim-5 summary of transfer matrices at several eps.

    Args:
      matrices: {eps key (e.g. "8/255"): {source: {target: accuracy}}}.
      clean: {model: clean accuracy}; models missing here are left out.

    Returns:
      A JSON-serialisable dict: "self_accuracy" {model: {eps: accuracy}},
      "easiest_to_fool" (model), "transfer_drop" {eps: {source: mean drop}},
      "transfers_best" (source, at the largest eps), and "statement" (one
      sentence). Empty when there are fewer than two models.
    """
    eps_keys = sorted(matrices, key=_eps_value)
    if not eps_keys:
        return {}
    models = [m for m in matrices[eps_keys[0]] if m in clean]
    if len(models) < 2:
        return {}
    self_accuracy = {m: {e: matrices[e][m][m] for e in eps_keys} for m in models}
    easiest = min(models, key=lambda m: [self_accuracy[m][e] for e in eps_keys])
    drops = {}
    for e in eps_keys:
        drops[e] = {
            source: sum(clean[t] - matrices[e][source][t] for t in models if t != source)
            / (len(models) - 1)
            for source in models
        }
    largest = eps_keys[-1]
    best = max(models, key=lambda s: drops[largest][s])
    return {
        "models": models,
        "self_accuracy": self_accuracy,
        "easiest_to_fool": easiest,
        "transfer_drop": drops,
        "transfers_best": best,
        "statement": (
            f"Easiest to fool: {easiest} (white-box accuracy "
            f"{100 * self_accuracy[easiest][eps_keys[0]]:.1f}% at eps {eps_keys[0]}); "
            f"best transfer: {best} (mean accuracy drop of the other models "
            f"{100 * drops[largest][best]:.1f} points at eps {largest})."
        ),
    }
