"""The attack registry: `AttackSpec`, `register`, `get_spec` and the budget rule.

Every model here is a `model_fn` mapping float32 images in [0, 1] to logits, and
every budget `eps` is in pixel units of that space (e.g. 8/255 for L-inf).

The attack functions are pure functions of `model_fn`, `x` and parameters, in
the style of CleverHans' tf2 attacks, with one signature:

    fn(model_fn, x, y, eps, *, steps, step_size, targeted, seed, clip_min,
       clip_max, **params) -> adversarial x

Each attack module spells this keyword signature out again on purpose (the
repeated lines that tools find between the attack modules): it is the contract
the runner calls, and each function documents its own defaults in it.

`y` holds the true labels (untargeted) or the target labels (targeted); they
are always given, so no attack falls back to the model's predictions (no label
leaking). `seed` is an int [2] seed of TF's stateless random ops.

Each attack lives in its own module of this package and registers its
`AttackSpec` (function, norm, defaults, schedule and budget policy) with
`register` when imported; `s2s_tf.robustness.attacks` imports them all.
`s2s_tf.robustness.runner` runs them in compiled, cached batches.
"""

import dataclasses
import types
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import numpy as np

from s2s_tf.robustness.attacks.base import L2
from s2s_tf.robustness.attacks.base import LINF
from s2s_tf.robustness.attacks.base import ORD

# Keys of `AttackSpec.defaults` that `s2s_tf.robustness.runner.run_attack` resolves
# itself; the rest are keyword parameters of the attack function.
_RUN_KEYS = ("steps", "step_size", "step_size_factor")

ATTACKS = {}


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One registered attack.

    Attributes:
      fn: the attack function (signature in the module docstring).
      norm: "linf" or "l2", the norm `eps` is measured in.
      uses_gradients: whether the attack backpropagates through the model.
      iterative: whether it takes several steps.
      description: one line for listings and reports.
      defaults: default `steps`, `step_size` (or `step_size_factor`, the step
        as a multiple of eps / steps) and keyword parameters of `fn`.
      stochastic: whether runs with different seeds differ (restarts pay off).
      eps_policy: "project" (the result is projected into the eps ball) or
        "reject" (examples perturbed beyond eps are returned unchanged).
      runner: builds the compiled per-batch attack; None wraps `fn` in one
        `tf.function`.
      own_schedule: whether its iteration count means something else (CW's
        Adam steps per binary-search step, SPSA's gradient estimates), so an
        evaluation's common `steps` setting does not apply to it.
      config_params: keyword parameters of `fn` that an evaluation sets from
        its config: parameter name -> `EvalConfig` field name.
    """

    fn: Callable[..., Any]
    norm: str
    uses_gradients: bool
    iterative: bool
    description: str
    defaults: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({})
    )
    stochastic: bool = False
    eps_policy: str = "project"
    runner: Callable[..., Any] | None = None
    own_schedule: bool = False
    config_params: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({})
    )

    def __post_init__(self):
        if self.norm not in ORD:
            raise ValueError(f"norm must be one of {sorted(ORD)}, got {self.norm!r}.")
        if self.eps_policy not in ("project", "reject"):
            raise ValueError(f"eps_policy must be project or reject, got {self.eps_policy!r}.")
        object.__setattr__(self, "defaults", types.MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "config_params", types.MappingProxyType(dict(self.config_params)))

    @property
    def params(self):
        """Default keyword parameters of `fn` (the defaults minus steps and step size)."""
        return {k: v for k, v in self.defaults.items() if k not in _RUN_KEYS}

    def budget(self, linf_eps, image_shape, l2_eps_scale):
        """This attack's budget for an evaluation's L-inf `linf_eps`.

        L2 attacks get eps * sqrt(H*W*C) * l2_eps_scale: with the default scale
        0.5, the L2 norm of an L-inf perturbation of size eps on a quarter of
        the pixels.
        """
        if self.norm == L2:
            return float(linf_eps * np.sqrt(np.prod(image_shape)) * l2_eps_scale)
        return float(linf_eps)


def register(name, spec):
    """Registers `spec` as `name`; returns `spec`. A name can be registered once."""
    if name in ATTACKS:
        raise ValueError(f"attack {name!r} is registered twice.")
    ATTACKS[name] = spec
    return spec


def get_spec(name):
    """Returns the `AttackSpec` registered as `name`; ValueError for unknown names."""
    if name not in ATTACKS:
        raise ValueError(f"Unknown attack {name!r}; known: {sorted(ATTACKS)}.")
    return ATTACKS[name]


def enforce_budget(spec, x, adv, eps, clip_min, clip_max):
    """Enforces the budget exactly on an attack's output.

    Args:
      spec: the attack's `AttackSpec` (its norm and eps policy).
      x: float32 numpy array, the clean images.
      adv: numpy array shaped like `x`, the attack's output.
      eps: the budget in `spec.norm`; None for no budget.
      clip_min: lowest pixel value.
      clip_max: highest pixel value.

    Returns:
      float32 array within `eps` of `x` (projected, or rejected per example
      for "reject" specs) and within [clip_min, clip_max].
    """
    delta = adv - x
    if eps is not None:
        if spec.norm == LINF:
            delta = np.clip(delta, -eps, eps)
        else:
            norms = np.sqrt(np.sum(np.square(delta), axis=tuple(range(1, x.ndim)), keepdims=True))
            if spec.eps_policy == "reject":
                delta = np.where(norms <= eps, delta, 0.0)
            else:
                delta = delta * np.minimum(1.0, eps / np.maximum(norms, 1e-12))
    return np.clip(x + delta, clip_min, clip_max).astype(np.float32)
