"""Threat models: who the attacker is, as a registry that the evaluation, flags and report read.

All images are float32 in [0, 1]. For a classifier C, the autoencoder A (as a
[0, 1] -> [0, 1] purifier P) and the defended model D = C o P, each threat
model names the model the attacker differentiates (or queries) and the attacks
it runs; the examples are always scored on D (and, for gray-box, on C too):

- gray_box (the paper's setting): examples made on C alone, fed to D;
- white_box: examples made on D, gradients end to end through P and C;
- bpda: examples made on D with P replaced by the identity in the backward
  pass (Athalye et al. 2018);
- surrogate: examples made on D with P's backward pass replaced by a smooth
  surrogate (soft routing of the unpooling switches), an adaptive attack on
  S2SNet's shattered gradients; one variant per relative temperature
  ("surrogate@0.3", ...), each pool's temperature scaled by its measured
  activation scale (`surrogates.calibrate`);
- gradient_free: score-based attacks on D (no gradients at all), on a subset;
- transfer: examples made on one model (each classifier, defended or not),
  evaluated on every other (a matrix; run by `evaluation.Evaluator`).

They are registered strongest-first (the order of an AutoAttack-style
cascade; `EvalConfig.threat_models` may reorder them). A new threat model is
one `register(ThreatModel(...))` call here.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

from s2s_tf.robustness import runner

THREATS = {}


@dataclasses.dataclass
class Models:
    """The models under evaluation, as model functions on [0, 1] images returning logits.

    The attack runner caches compiled attacks per model object, so each derived
    model (BPDA, surrogates) is built once here and reused.

    Attributes:
      classifier: the undefended classifier C.
      defended: the defended model D = C o P.
      purifier: P, the autoencoder from [0, 1] images to [0, 1] images.
      others: further classifiers (name -> model_fn) for the transfer matrix,
        e.g. {"vgg16": ..., "vgg16+s2s": ...}.
    """

    classifier: object
    defended: object
    purifier: object
    others: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.bpda = runner.bpda_model_fn(self.purifier, self.classifier)
        self._surrogates = {}
        # Pool name -> activation scale of the surrogate's relative temperatures.
        self.scales = None

    def calibrate(self, images):
        """Measures the surrogate's per-pool scales on `images` (once; later calls keep them)."""
        if self.scales is None:
            from s2s_tf.robustness import surrogates  # the surrogate needs the model internals

            self.scales = surrogates.calibrate(self.purifier, images)
        return self.scales

    def surrogate(self, temperature):
        """D forward, the soft-routing surrogate of P backward, at a relative temperature."""
        if self.scales is None:
            raise ValueError("call Models.calibrate(images) before building surrogates")
        if temperature not in self._surrogates:
            from s2s_tf.robustness import surrogates

            self._surrogates[temperature] = surrogates.soft_routing_model_fn(
                self.purifier, self.classifier, temperature, scales=self.scales
            )
        return self._surrogates[temperature]


@dataclasses.dataclass(frozen=True)
class ThreatModel:
    """One threat model.

    Attributes:
      name: the registry key (flags, JSON keys).
      title: one line for the report.
      attacker: (models, config) -> the model_fn the attacks run on; None for
        the transfer matrix, which the evaluator runs itself.
      attacks: config -> the attack names to run.
      num_examples: (config, n) -> how many of the n examples to attack.
      steps: config -> the iterations of its attacks (those without an own
        schedule); None: the evaluation's `steps`.
      score_classifier: also report the undefended classifier's accuracy.
      gradient: whether its attacks differentiate (the attack suite runs
        through it; its model's gradient is checked before any attack).
      variants: (models, config) -> {run name: model_fn}, for a threat model
        with several versions (the surrogate's temperatures); None: one,
        named `name`, attacking `attacker(models, config)`.
    """

    name: str
    title: str
    attacker: Callable[[Models, Any], Any] | None
    attacks: Callable[[Any], tuple]
    num_examples: Callable[[Any, int], int] = lambda config, n: n
    steps: Callable[[Any], int] | None = None
    score_classifier: bool = False
    gradient: bool = True
    variants: Callable[[Models, Any], dict] | None = None

    def sources(self, models, config):
        """{run name: the model_fn attacked} of each version of this threat model."""
        if self.variants is not None:
            return self.variants(models, config)
        return {self.name: self.attacker(models, config)}


def register(threat):
    """Registers `threat` under its name; returns it."""
    if threat.name in THREATS:
        raise ValueError(f"threat model {threat.name!r} is registered twice.")
    THREATS[threat.name] = threat
    return threat


def variant_name(threat, temperature):
    """The run name of one temperature of a threat model: "surrogate@0.3"."""
    return f"{threat}@{temperature:g}"


def get(name):
    """The registered `ThreatModel` called `name`; ValueError naming the known ones."""
    if name not in THREATS:
        raise ValueError(f"unknown threat model {name!r}; known: {list(THREATS)}")
    return THREATS[name]


register(
    ThreatModel(
        "surrogate",
        "soft-routing surrogate (smooth unpooling switches in the backward pass)",
        lambda models, config: models.surrogate(config.surrogate_temperatures[0]),
        lambda config: config.attacks,
        variants=lambda models, config: {
            variant_name("surrogate", t): models.surrogate(t) for t in config.surrogate_temperatures
        },
    )
)
register(
    ThreatModel(
        "bpda",
        "BPDA (autoencoder as identity in the backward pass)",
        lambda models, config: models.bpda,
        lambda config: config.attacks,
    )
)
register(
    ThreatModel(
        "white_box",
        "white-box (end to end through autoencoder and classifier)",
        lambda models, config: models.defended,
        lambda config: config.attacks,
    )
)
register(
    ThreatModel(
        "gray_box",
        "gray-box (made on the classifier, fed to the defended model)",
        lambda models, config: models.classifier,
        lambda config: config.attacks,
        score_classifier=True,
    )
)
register(
    ThreatModel(
        "gradient_free",
        "gradient-free (score-based, forward passes only)",
        lambda models, config: models.defended,
        lambda config: config.gradient_free_attacks,
        # None: every example; 0 (a shard past the first ones): none.
        num_examples=lambda config, n: (
            n if config.gradient_free_examples is None else min(n, config.gradient_free_examples)
        ),
        steps=lambda config: config.gradient_free_queries,
        gradient=False,
    )
)
register(
    ThreatModel(
        "transfer",
        "transfer (made on one model, evaluated on another)",
        None,
        lambda config: (config.transfer_attack,),
        gradient=False,
    )
)
