"""`EvalConfig`, the attack settings of an evaluation, and its presets.

Every eps is in [0, 1] pixel units. `PRESETS` holds the attack suites:
"standard" (AutoAttack's: APGD-CE, APGD-T over 9 target classes, FAB-T and
Square with 5,000 queries, plus APGD-DLR, at 100 steps, through every
backward pass: white-box, BPDA and the soft-routing surrogate at three
temperatures; >= 500 examples) and "fast" (the same kinds of attack with
fewer steps, targets and queries, for the main job; its 50 APGD steps keep
the step-size schedule's checkpoints apart).
"""

import dataclasses
import math

from s2s_tf import config_io
from s2s_tf.config_io import setting
from s2s_tf.robustness import attacks as attacks_lib
from s2s_tf.robustness import threat_models


def _check_attacks(names):
    unknown = [a for a in names if a not in attacks_lib.ATTACKS]
    if unknown:
        raise ValueError(f"unknown attacks {unknown}; known: {sorted(attacks_lib.ATTACKS)}")


def parse_temperatures(text):
    """Parses "0.3,1,3" into positive finite floats (relative surrogate temperatures)."""
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(
            f"--surrogate_temperatures must be comma-separated numbers, got {text!r}"
        ) from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"--surrogate_temperatures must be finite and > 0, got {text!r}")
    return values


def unparse_temperatures(values):
    """(0.3, 1.0) -> "0.3,1"."""
    return ",".join(f"{v:g}" for v in values)


# The attacks AutoAttack's standard version runs, and APGD-DLR.
STANDARD_ATTACKS = tuple(
    a for a in ("apgd_ce", "apgd_t", "fab_t", "apgd_dlr") if a in attacks_lib.ATTACKS
)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to attack and how (the defaults are the "standard" preset).

    Attributes:
      attacks: the gradient attack suite, run through every gradient threat
        model's backward pass (gray-box, white-box, BPDA, each surrogate
        temperature) in this order; one list, so the threat models cannot
        drift apart.
      gradient_free_attacks: attacks of the gradient-free threat model.
      eps: L-inf budgets in [0, 1] pixel units (L2 attacks scale them, see `l2_eps_scale`).
      threat_models: names of `threat_models.THREATS`, in the cascade's order.
      cascade: run each attack only on the examples still robust after the
        previous ones (AutoAttack's order; the worst case is the same); False
        runs every attack on every example (a full matrix, for comparison).
      num_examples: evaluation examples (None: all of them).
      batch_size: attack batch size.
      steps: iterations of the iterative gradient attacks.
      restarts: random restarts of the stochastic attacks.
      target_classes: APGD-T's and FAB-T's target classes per example.
      gradient_free_examples: examples of the gradient-free attacks (None: all).
      gradient_free_queries: iterations (queries) of score-based attacks such as Square.
      surrogate_temperatures: temperatures of the soft-routing surrogate,
        relative to each pool's measured scale (`surrogates.calibrate`), each
        a threat model of its own ("surrogate@1").
      surrogate_calibration_examples: the first examples that set the scales.
      check_attack: the reference attack (default: the first of `attacks`):
        it runs on every example in every gradient threat model (paired runs
        for the masking checks), and the convergence checks rerun it, on the
        threat model where it fooled the most, with twice the steps and with
        more restarts.
      check_extra_restarts: restarts the convergence check adds to `restarts`
        (in its first round; twice as many more in each further round).
      convergence_rounds: rounds of the more-steps and the restarts reruns:
        round 1 runs twice the steps, and `check_extra_restarts` more restarts;
        round k 2**k times the steps, and `restarts` + `check_extra_restarts` *
        2**(k-1) restarts, each on the examples its round k-1 left robust; the
        convergence verdict is the last round's of each. A fixed number, so a
        split evaluated in shards runs the same attacks on every example as one
        evaluated at once.
      large_eps: the budget at which the strongest attack must reach ~0 %.
      transfer_attack: the attack that makes the transfer matrix.
      transfer_eps: its budget (default: the largest of `eps`).
      l2_eps_scale: L2 budgets are eps * sqrt(H*W*C) * l2_eps_scale.
      seed: random seed of the attacks.
    """

    attacks: tuple = setting(
        STANDARD_ATTACKS,
        "Gradient attack suite, run through every gradient threat model, in cascade order.",
        choices=lambda: attacks_lib.ATTACKS,
    )
    gradient_free_attacks: tuple = setting(
        ("square",), "Score-based attacks (no gradients).", choices=lambda: attacks_lib.ATTACKS
    )
    eps: tuple = setting(
        (2 / 255, 4 / 255, 8 / 255, 16 / 255),
        "L-inf budgets (pixel units).",
        parse=config_io.parse_eps_list,
        unparse=config_io.unparse_eps_list,
    )
    threat_models: tuple = setting(
        tuple(threat_models.THREATS),
        "Threat models to evaluate, in the cascade's order.",
        choices=tuple(threat_models.THREATS),
    )
    cascade: bool = setting(
        True,
        "Attack only the examples still robust after the previous attacks (same worst case, "
        "less time); false runs every attack on every example.",
    )
    num_examples: int | None = setting(
        500,
        "Examples attacked (the first of the split), or 'all' for the whole split.",
        parse=config_io.parse_count,
        unparse=config_io.unparse_count,
    )
    batch_size: int = 100
    steps: int = setting(100, "Iterations of the iterative gradient attacks.", lower_bound=1)
    restarts: int = setting(1, "Random restarts of the stochastic attacks.", lower_bound=1)
    target_classes: int = setting(
        9, "Target classes per example of the targeted attacks.", lower_bound=1
    )
    gradient_free_examples: int | None = setting(
        None,
        "Examples of the gradient-free attacks (the first ones), or 'all'.",
        parse=lambda text: config_io.parse_count(text, "gradient_free_examples"),
        unparse=config_io.unparse_count,
    )
    gradient_free_queries: int = setting(
        5000, "Queries (iterations) of score-based attacks (Square).", lower_bound=1
    )
    surrogate_temperatures: tuple = setting(
        (0.3, 1.0, 3.0),
        "Soft-routing surrogate temperatures, relative to each pool's median window gap.",
        parse=parse_temperatures,
        unparse=unparse_temperatures,
    )
    surrogate_calibration_examples: int = setting(
        256, "Examples that measure the surrogate's per-pool scales.", lower_bound=1
    )
    check_attack: str | None = None
    check_extra_restarts: int = 2
    convergence_rounds: int = setting(
        2,
        "Rounds of the convergence reruns of the strongest attack: round k runs 2**k times the "
        "steps, and twice round k-1's extra restarts, on what round k-1 left robust; the "
        "verdict is the last round's.",
        lower_bound=1,
    )
    large_eps: float = 64 / 255
    transfer_attack: str = "pgd"
    transfer_eps: float | None = None
    l2_eps_scale: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if self.check_attack is None and self.attacks:
            object.__setattr__(self, "check_attack", self.attacks[0])

    def validate(self):
        """Raises ValueError naming the first invalid field."""
        _check_attacks(
            (*self.attacks, *self.gradient_free_attacks, self.transfer_attack, self.check_attack)
        )
        if self.check_attack not in self.attacks:
            raise ValueError(
                f"check_attack {self.check_attack!r} must be one of attacks {self.attacks}"
            )
        gradient_free = [a for a in self.attacks if not attacks_lib.ATTACKS[a].uses_gradients]
        if gradient_free:
            raise ValueError(f"attacks must use gradients; {gradient_free} do not")
        for name in self.threat_models:
            threat_models.get(name)
        if not self.eps or any(not 0 <= e <= 1 for e in self.eps):
            raise ValueError(f"eps must be non-empty values in [0, 1], got {self.eps}")
        if self.num_examples is not None and self.num_examples < 1:
            raise ValueError(f"num_examples must be >= 1 or None (all), got {self.num_examples}")
        for name in (
            "batch_size",
            "steps",
            "restarts",
            "surrogate_calibration_examples",
            "convergence_rounds",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        parse_temperatures(unparse_temperatures(self.surrogate_temperatures))


PRESETS = {
    "standard": EvalConfig(),
    # The main job's suite (minutes on a 2-core CPU): APGD-CE and APGD-T through every
    # backward pass, one surrogate temperature, fewer targets and queries. 50 APGD steps: the
    # schedule's checkpoints stay >= 3 steps apart (at 20 they collapse to every step).
    # 100 examples, 500 Square queries and no 2/255 for the main job's time budget: on its
    # S2SNet (100 examples) the runs at 2/255 took 294 s of 687 (most examples survive the
    # reference runs there, so every cascade run and the convergence reruns see them all).
    # `--eps=2/255,4/255,8/255,16/255` puts it back.
    "fast": EvalConfig(
        attacks=("apgd_ce", "apgd_t"),
        eps=(4 / 255, 8 / 255, 16 / 255),
        num_examples=100,
        steps=50,
        target_classes=2,
        gradient_free_queries=500,
        # On a trained main-job S2SNet (PGD/APGD through each temperature, 200 examples),
        # 0.3 fooled the most at 4/255 and 8/255 (0.1 and 1 fewer).
        surrogate_temperatures=(0.3,),
        check_extra_restarts=1,
    ),
}


def preset(name, **overrides):
    """The `EvalConfig` of preset `name` with `overrides`; ValueError for unknown names."""
    if name not in PRESETS:
        raise ValueError(f"unknown attack preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
