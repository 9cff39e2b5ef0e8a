"""Carlini-Wagner L2 (the fixed CleverHans attack), eager only.

`eps` for `cw_l2`: Carlini-Wagner L2 minimises the perturbation instead of
working inside a budget. It runs unbounded and `eps` is then an L2 budget in
pixel units: examples whose CW perturbation is larger than `eps` come back
unchanged, i.e. the attack counts as failed on them. `eps=None` returns the
unbounded CW result.
"""

import numpy as np

from s2s_tf.robustness import cleverhans_shim
from s2s_tf.robustness.attacks import base
from s2s_tf.robustness.attacks import registry


def cw_l2(
    model_fn,
    x,
    y,
    eps=None,
    *,
    steps=100,
    step_size=0.01,
    targeted=False,
    seed=None,
    clip_min=0.0,
    clip_max=1.0,
    **params,
):
    """Carlini-Wagner L2 (the fixed CleverHans attack), eager only.

    `steps` is the number of Adam iterations per binary-search step and
    `step_size` Adam's learning rate; `params` go to
    `cleverhans_shim.CarliniWagnerL2` (binary_search_steps, initial_const,
    confidence, abort_early). Examples whose perturbation has an L2 norm above
    `eps` are returned unchanged (`eps=None`: no budget). This builds and
    compiles a new attack per call; `s2s_tf.attacks.run_attack` caches it.
    """
    del seed
    runner = _CWRunner(
        model_fn, steps=steps, targeted=targeted, clip_min=clip_min, clip_max=clip_max, **params
    )
    x = np.asarray(x, np.float32)
    adv = np.asarray(runner(x, np.asarray(y), None, step_size, None))
    return registry.enforce_budget(SPEC, x, adv, eps, clip_min, clip_max)


class _CWRunner:
    """Compiled per-batch CW-L2: one shim attack object per learning rate."""

    def __init__(self, model_fn, *, steps, **kwargs):
        self._model_fn = model_fn
        self._kwargs = dict(max_iterations=steps, **kwargs)
        self._attacks = {}

    def __call__(self, x, y, eps, step_size, seed):
        del eps, seed  # the budget is applied to the result; CW is deterministic
        learning_rate = float(step_size)
        if learning_rate not in self._attacks:
            self._attacks[learning_rate] = cleverhans_shim.CarliniWagnerL2(
                self._model_fn, learning_rate=learning_rate, **self._kwargs
            )
        return self._attacks[learning_rate].attack_batch(x, y)


SPEC = registry.register(
    "cw_l2",
    registry.AttackSpec(
        cw_l2,
        base.L2,
        True,
        True,
        "Carlini-Wagner L2 (minimal perturbation); eps is an L2 budget on its result.",
        {
            "steps": 100,
            "step_size": 0.01,
            "binary_search_steps": 5,
            "initial_const": 0.1,
            "confidence": 0.0,
            "abort_early": True,
        },
        eps_policy="reject",
        runner=_CWRunner,
        own_schedule=True,
    ),
)
