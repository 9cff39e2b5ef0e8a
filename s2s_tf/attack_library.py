"""Adversarial attacks on [0, 1] images as pure functions, and their registry.

Every model here is a `model_fn` mapping float32 images in [0, 1] to logits, and
every budget `eps` is in pixel units of that space (e.g. 8/255 for L-inf).

The attack functions are pure functions of `model_fn`, `x` and parameters, in
the style of CleverHans' tf2 attacks, with one signature:

    fn(model_fn, x, y, eps, *, steps, step_size, targeted, seed, clip_min,
       clip_max, **params) -> adversarial x

`y` holds the true labels (untargeted) or the target labels (targeted); they
are always given, so no attack falls back to the model's predictions (no label
leaking). `seed` is an int [2] seed of TF's stateless random ops. Except
`cw_l2`, they run eagerly or inside a `tf.function`.

`ATTACKS` maps each name to an `AttackSpec` (function, norm, defaults, budget
policy). `s2s_tf.attacks` runs them in compiled, cached batches and re-exports
this module's public names.

`eps` for `cw_l2`: Carlini-Wagner L2 minimises the perturbation instead of
working inside a budget. It runs unbounded and `eps` is then an L2 budget in
pixel units: examples whose CW perturbation is larger than `eps` come back
unchanged, i.e. the attack counts as failed on them. `eps=None` returns the
unbounded CW result.
"""

import dataclasses
import types
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf
from cleverhans.tf2.attacks.fast_gradient_method import fast_gradient_method
from cleverhans.tf2.utils import clip_eta
from cleverhans.tf2.utils import optimize_linear

from s2s_tf import cleverhans_shim

LINF = "linf"
L2 = "l2"
_ORD = {LINF: np.inf, L2: 2}
# Keys of `AttackSpec.defaults` that `s2s_tf.attacks.run_attack` resolves
# itself; the rest are keyword parameters of the attack function.
_RUN_KEYS = ("steps", "step_size", "step_size_factor")


def _logits(model_fn, x):
    return tf.cast(model_fn(x), tf.float32)


def _loss_gradient(model_fn, x, y, targeted):
    """Gradient of the cross-entropy (negated when targeted) with respect to `x`."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=_logits(model_fn, x))
        if targeted:
            loss = -loss
    return tape.gradient(loss, x)


def _project(x, adv, eps, norm, clip_min, clip_max):
    """Projects `adv` onto the `norm` ball of radius `eps` around `x` and the clip range."""
    return tf.clip_by_value(x + clip_eta(adv - x, _ORD[norm], eps), clip_min, clip_max)


def _random_start(x, eps, norm, seed):
    """A uniform sample of the L-inf or L2 ball of radius `eps` (stateless)."""
    if norm == LINF:
        return eps * tf.random.stateless_uniform(tf.shape(x), seed, -1.0, 1.0)
    direction_seed, radius_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    axes = list(range(1, len(x.shape)))
    direction = tf.random.stateless_normal(tf.shape(x), direction_seed)
    direction /= tf.sqrt(tf.reduce_sum(tf.square(direction), axes, keepdims=True))
    dim = tf.cast(tf.reduce_prod(tf.shape(x)[1:]), x.dtype)
    radius_shape = tf.concat([tf.shape(x)[:1], tf.ones([len(axes)], tf.int32)], 0)
    radius = tf.random.stateless_uniform(radius_shape, radius_seed) ** (1.0 / dim)
    return eps * radius * direction


def _prepare(x, y, eps, seed):
    x = tf.convert_to_tensor(x, tf.float32)
    seed = tf.convert_to_tensor((0, 0) if seed is None else seed, tf.int64)
    return x, tf.convert_to_tensor(y, tf.int32), tf.cast(eps, tf.float32), seed


def fgsm(model_fn, x, y, eps, *, targeted=False, clip_min=0.0, clip_max=1.0, **unused):
    """Fast gradient sign method (Goodfellow et al. 2015), CleverHans' implementation."""
    del unused  # steps, step_size, seed: one deterministic step of size eps
    x, y, eps, _ = _prepare(x, y, eps, None)
    return fast_gradient_method(
        model_fn, x, eps, np.inf, clip_min=clip_min, clip_max=clip_max, y=y, targeted=targeted
    )


def pgd(
    model_fn,
    x,
    y,
    eps,
    *,
    steps=10,
    step_size=None,
    targeted=False,
    seed=None,
    clip_min=0.0,
    clip_max=1.0,
    norm=LINF,
    rand_init=True,
):
    """Projected gradient descent (Madry et al. 2018) on the cross-entropy.

    CleverHans' PGD step (`optimize_linear`, `clip_eta`) in a `tf.while_loop`,
    so the loop compiles to one graph of any length. `rand_init` starts from a
    uniform point of the `norm` ball drawn with `seed`; without it this is BIM.
    `step_size` defaults to 2.5 * eps / steps.
    """
    x, y, eps, seed = _prepare(x, y, eps, seed)
    step_size = 2.5 * eps / steps if step_size is None else tf.cast(step_size, tf.float32)
    adv = x
    if rand_init:
        adv = _project(x, x + _random_start(x, eps, norm, seed), eps, norm, clip_min, clip_max)

    def body(i, adv):
        grad = _loss_gradient(model_fn, adv, y, targeted)
        adv = adv + optimize_linear(grad, step_size, _ORD[norm])
        return i + 1, _project(x, adv, eps, norm, clip_min, clip_max)

    _, adv = tf.while_loop(lambda i, _: i < steps, body, (tf.constant(0), adv))
    return adv


def bim(model_fn, x, y, eps, **kwargs):
    """Basic iterative method (Kurakin et al. 2017): L-inf PGD without random start."""
    return pgd(model_fn, x, y, eps, norm=LINF, rand_init=False, **kwargs)


def pgd_l2(model_fn, x, y, eps, **kwargs):
    """L2 PGD with a random start in the L2 ball; `eps` is the L2 radius in pixel units."""
    return pgd(model_fn, x, y, eps, norm=L2, rand_init=True, **kwargs)


def mim(
    model_fn,
    x,
    y,
    eps,
    *,
    steps=10,
    step_size=None,
    targeted=False,
    seed=None,
    clip_min=0.0,
    clip_max=1.0,
    decay_factor=1.0,
):
    """Momentum iterative method (Dong et al. 2018), L-inf.

    CleverHans' update (gradient normalised by its mean absolute value,
    accumulated with `decay_factor`, sign step) in a `tf.while_loop`; CleverHans'
    own function asserts on tensors and cannot be compiled. `step_size`
    defaults to eps / steps, as in the paper.
    """
    del seed
    x, y, eps, _ = _prepare(x, y, eps, None)
    step_size = eps / steps if step_size is None else tf.cast(step_size, tf.float32)
    axes = list(range(1, len(x.shape)))

    def body(i, adv, momentum):
        grad = _loss_gradient(model_fn, adv, y, targeted)
        grad /= tf.maximum(1e-12, tf.reduce_mean(tf.abs(grad), axes, keepdims=True))
        momentum = decay_factor * momentum + grad
        adv = adv + optimize_linear(momentum, step_size, np.inf)
        return i + 1, _project(x, adv, eps, LINF, clip_min, clip_max), momentum

    loop_vars = (tf.constant(0), x, tf.zeros_like(x))
    return tf.while_loop(lambda i, *_: i < steps, body, loop_vars)[1]


def spsa(
    model_fn,
    x,
    y,
    eps,
    *,
    steps=40,
    step_size=0.01,
    targeted=False,
    seed=None,
    clip_min=0.0,
    clip_max=1.0,
    spsa_samples=64,
    spsa_iters=1,
    delta=0.01,
    early_stop_loss_threshold=0.0,
):
    """SPSA (Uesato et al. 2018), gradient-free L-inf; one image at a time, as CleverHans.

    `step_size` is the learning rate of SPSA's Adam. The default early stop at
    loss 0 ends an example's search once it is misclassified (or reaches the
    target). SPSA draws from TF's global random generator, not from `seed`.
    """
    del seed
    x, y, eps, _ = _prepare(x, y, eps, None)

    def one_example(example):
        image, label = example
        adv = cleverhans_shim.spsa(
            model_fn,
            image[None],
            label[None],
            eps,
            steps,
            clip_min=clip_min,
            clip_max=clip_max,
            targeted=targeted,
            early_stop_loss_threshold=early_stop_loss_threshold,
            learning_rate=step_size,
            delta=delta,
            spsa_samples=spsa_samples,
            spsa_iters=spsa_iters,
        )
        return adv[0]

    return tf.map_fn(one_example, (x, y), fn_output_signature=tf.float32)


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
    return enforce_budget(ATTACKS["cw_l2"], x, adv, eps, clip_min, clip_max)


def testing(model_fn, x, y, eps, *, seed=None, clip_min=0.0, clip_max=1.0, **unused):
    """Uniform random noise in the L-inf ball: a baseline and a fast test attack."""
    del model_fn, unused
    x, _, eps, seed = _prepare(x, y, eps, seed)
    noise = eps * tf.random.stateless_uniform(tf.shape(x), seed, -1.0, 1.0)
    return tf.clip_by_value(x + noise, clip_min, clip_max)


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

    def __post_init__(self):
        if self.norm not in _ORD:
            raise ValueError(f"norm must be one of {sorted(_ORD)}, got {self.norm!r}.")
        if self.eps_policy not in ("project", "reject"):
            raise ValueError(f"eps_policy must be project or reject, got {self.eps_policy!r}.")
        object.__setattr__(self, "defaults", types.MappingProxyType(dict(self.defaults)))

    @property
    def params(self):
        """Default keyword parameters of `fn` (the defaults minus steps and step size)."""
        return {k: v for k, v in self.defaults.items() if k not in _RUN_KEYS}


ATTACKS = {
    "fgsm": AttackSpec(fgsm, LINF, True, False, "FGSM: one signed-gradient step of size eps."),
    "bim": AttackSpec(
        bim,
        LINF,
        True,
        True,
        "BIM: iterative FGSM from the clean image.",
        {"steps": 10, "step_size_factor": 2.5},
    ),
    "pgd": AttackSpec(
        pgd,
        LINF,
        True,
        True,
        "PGD (L-inf) from a random start; restarts keep the strongest.",
        {"steps": 10, "step_size_factor": 2.5},
        stochastic=True,
    ),
    "pgd_l2": AttackSpec(
        pgd_l2,
        L2,
        True,
        True,
        "PGD (L2) from a random start in the L2 ball.",
        {"steps": 10, "step_size_factor": 2.5},
        stochastic=True,
    ),
    "mim": AttackSpec(
        mim,
        LINF,
        True,
        True,
        "Momentum iterative method (L-inf).",
        {"steps": 10, "step_size_factor": 1.0, "decay_factor": 1.0},
    ),
    "cw_l2": AttackSpec(
        cw_l2,
        L2,
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
    ),
    "spsa": AttackSpec(
        spsa,
        LINF,
        False,
        True,
        "SPSA: gradient-free (forward passes only), L-inf.",
        {
            "steps": 40,
            "step_size": 0.01,
            "spsa_samples": 64,
            "spsa_iters": 1,
            "delta": 0.01,
            "early_stop_loss_threshold": 0.0,
        },
        stochastic=True,
    ),
    "testing": AttackSpec(
        testing, LINF, False, False, "Uniform noise in the L-inf ball.", stochastic=True
    ),
}


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
