"""Adversarial training inside the training graph: the inner attack, its seeds, its losses.

The training stages call `perturb` in their per-replica step: an L-inf attack
(PGD-k, or one FGSM step, each from a uniform random start; Madry et al. 2018,
Wong et al. 2020) that maximises a per-example loss of a `model_fn` and stays
within `eps` of the clean images and within [0, 1]. For the S2SNet the
`model_fn` is the project's strongest differentiable attack
(`surrogates.soft_routing_model_fn`: the real defended model forward, the
soft-routing surrogate backward); training against the hard switches'
gradient would only teach the decoder to mask it.

Every random start is drawn from a seed made of the run's seed, the global step
and the example's index in the global batch (`example_seeds`), so N replicas
draw what one would and a resumed run draws what an uninterrupted one did.

`robust_accuracy` is the held-out check the trainer runs at each evaluation: a
multi-step PGD against the labels, best iterate per example, scored on the real
model.
"""

import dataclasses

import tensorflow as tf

from s2s_tf import config_io
from s2s_tf.config_io import setting

TRAIN_ATTACKS = ("pgd", "fgsm_rs")
# Step sizes of the training attacks relative to eps: PGD-k takes 2.5 eps / k per step
# (Madry et al.), so k steps can cross the ball and back; one FGSM step from a random start
# takes 1.25 eps (Wong et al. 2020; 2 eps and more overfit catastrophically).
PGD_STEP_FACTOR = 2.5
FGSM_RS_STEP_FACTOR = 1.25


def parse_budget(text):
    """Parses one L-inf budget, "8/255" or "0.03", with the evaluation's eps parser."""
    try:
        values = config_io.parse_eps_list(text)
    except ValueError as e:
        raise ValueError(str(e).replace("--eps items", "budgets")) from None
    if len(values) != 1:
        raise ValueError(f"takes one budget like 8/255, got {text!r}")
    return values[0]


def unparse_budget(value):
    """8/255 -> "8/255"; None -> None."""
    return None if value is None else config_io.unparse_eps_list((value,))


def _check_budget(value):
    if value is not None and not 0.0 < value <= 1.0:
        raise ValueError(f"must be in (0, 1] pixel units, got {value}")


@dataclasses.dataclass(frozen=True)
class AdversarialConfig:
    """The inner attack of adversarial training and the held-out robustness check.

    Attributes:
      train_eps: L-inf budget in [0, 1] pixel units.
      train_attack: "pgd" (PGD-k) or "fgsm_rs" (one step), both from a random start.
      train_attack_steps: steps of PGD-k (fgsm_rs takes one).
      train_step_size: step in pixel units; None: 2.5 eps / k (PGD), 1.25 eps (fgsm_rs).
      train_eps_ramp_steps: steps over which the training budget (and the attack's step
        with it) rises linearly to `train_eps`; 0: the whole budget from the first step.
      robust_weight: weight of the robust term (TRADES' beta in stage 2).
      train_surrogate_temperature: the soft-routing surrogate's temperature relative
        to each pool's measured activation scale (`surrogates.calibrate`); stage 2.
      robust_check_examples: held-out examples of the check (0: no check).
      robust_check_steps: steps of the check's PGD.
    """

    train_eps: float = setting(
        8 / 255,
        "L-inf budget of the training attack (adversarial objectives), e.g. 8/255.",
        parse=parse_budget,
        unparse=unparse_budget,
        check=_check_budget,
    )
    train_attack: str = setting(
        "pgd",
        "Training attack: pgd (PGD-k) or fgsm_rs (one FGSM step), from a random start.",
        choices=TRAIN_ATTACKS,
    )
    train_attack_steps: int = setting(5, "Steps of the training PGD.", lower_bound=1)
    train_step_size: float | None = setting(
        None,
        "Step of the training attack, e.g. 2/255 (default: 2.5*eps/steps for pgd, 1.25*eps "
        "for fgsm_rs).",
        parse=parse_budget,
        unparse=unparse_budget,
        check=_check_budget,
    )
    # 0 here, since a ramp counted in steps must fit each run (`check_ramp`); the robust job
    # (scripts/run_robust.sh) sets 200, which measured better (README, "A ramp of the training
    # budget").
    train_eps_ramp_steps: int = setting(
        0,
        "Steps over which the training budget rises linearly from 0 to --train_eps (the "
        "attack's step with it); 0: the whole budget from the first step.",
        lower_bound=0,
    )
    # 3 measured better than TRADES' usual 6 on both axes in the robust job (held-out check
    # 65.6 % against 57.8 %, clean 83.9 % against 82.9 %; README, "Adversarial stage 2").
    robust_weight: float = setting(
        3.0, "Stage 2 adversarial: weight of the robust KL term (TRADES' beta).", lower_bound=0
    )
    train_surrogate_temperature: float = setting(
        0.3,
        "Stage 2 adversarial: the surrogate's temperature, relative to each pool's scale.",
        check=config_io.check_positive,
    )
    robust_check_examples: int = setting(
        128,
        "Held-out examples of the robust-accuracy check at each evaluation (0: none).",
        lower_bound=0,
    )
    robust_check_steps: int = setting(10, "Steps of the check's PGD.", lower_bound=1)

    def validate(self):
        """Raises ValueError naming the first invalid field."""
        _check_budget(self.train_eps)
        if self.train_eps is None:
            raise ValueError("train_eps must be set")
        _check_budget(self.train_step_size)
        if self.train_attack not in TRAIN_ATTACKS:
            raise ValueError(f"train_attack must be one of {TRAIN_ATTACKS}")
        for name in ("train_attack_steps", "robust_check_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.robust_weight < 0 or self.robust_check_examples < 0:
            raise ValueError("robust_weight and robust_check_examples must be >= 0")
        if not isinstance(self.train_eps_ramp_steps, int) or self.train_eps_ramp_steps < 0:
            raise ValueError(
                f"train_eps_ramp_steps must be an int >= 0, got {self.train_eps_ramp_steps!r}"
            )
        if not self.train_surrogate_temperature > 0:
            raise ValueError("train_surrogate_temperature must be > 0")

    @property
    def steps(self):
        """Gradient steps of the training attack."""
        return 1 if self.train_attack == "fgsm_rs" else self.train_attack_steps

    @property
    def step_size(self):
        """The training attack's step in pixel units."""
        if self.train_step_size is not None:
            return self.train_step_size
        if self.train_attack == "fgsm_rs":
            return FGSM_RS_STEP_FACTOR * self.train_eps
        return PGD_STEP_FACTOR * self.train_eps / self.train_attack_steps

    def check_ramp(self, steps, name):
        """Raises ValueError if the budget ramp outlasts a run of `steps` steps (`name` its flag).

        A ramp longer than the run never trains at the whole budget, and the final BatchNorm
        re-estimation would see smaller perturbations than the ones the model is meant for.
        """
        if self.train_eps_ramp_steps > steps:
            raise ValueError(
                f"train_eps_ramp_steps ({self.train_eps_ramp_steps}) exceeds {name} ({steps}): "
                "the run would never train at the whole budget train_eps"
            )

    def ramp(self, step):
        """float32 scalar in (0, 1]: the share of the budget the training attack has at `step`.

        (step + 1) / train_eps_ramp_steps until it reaches 1, so step 0 already attacks
        and step train_eps_ramp_steps - 1 has the whole budget.
        """
        if not self.train_eps_ramp_steps:
            return tf.constant(1.0)
        share = tf.cast(step + 1, tf.float32) / float(self.train_eps_ramp_steps)
        return tf.minimum(share, 1.0)

    def budget_at(self, step):
        """(eps, step size) of the training attack at global step `step`, as tensors."""
        share = self.ramp(step)
        return self.train_eps * share, self.step_size * share


def example_seeds(seed, step, batch_size):
    """int64 [b, 2] seeds: (run seed and global step, the example's index in the global batch).

    Replica r of a step holds rows r*b ... r*b + b - 1 of the global batch (each input
    pipeline yields per-replica batches in replica order), so every example gets the seed
    it would get on one replica.
    """
    context = tf.distribute.get_replica_context()
    replica = 0 if context is None else context.replica_id_in_sync_group
    batch_size = tf.cast(batch_size, tf.int64)
    index = tf.cast(replica, tf.int64) * batch_size + tf.range(batch_size, dtype=tf.int64)
    key = tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(step, tf.int64)
    return tf.stack([tf.fill([batch_size], key), index], axis=1)


def random_start(x, eps, seeds):
    """x plus uniform noise in [-eps, eps] (one stateless draw per example), clipped to [0, 1]."""
    noise = tf.map_fn(
        lambda seed: tf.random.stateless_uniform(tf.shape(x)[1:], seed, -1.0, 1.0),
        seeds,
        fn_output_signature=tf.float32,
    )
    return tf.clip_by_value(x + eps * noise, 0.0, 1.0)


def project(x, adv, eps):
    """`adv` moved into the L-inf ball of radius `eps` around `x` and into [0, 1]."""
    return tf.clip_by_value(tf.clip_by_value(adv, x - eps, x + eps), 0.0, 1.0)


def perturb(model_fn, x, loss_fn, eps, steps, step_size, seeds):
    """Signed-gradient ascent on `loss_fn(model_fn(adv))` from a random start, in the graph.

    Args:
      model_fn: images in [0, 1] -> logits; its gradient is the one the attack follows.
      x: float32 [b, H, W, C] clean images in [0, 1].
      loss_fn: logits -> per-example loss [b] to maximise.
      eps: L-inf budget.
      steps: gradient steps.
      step_size: each step's size (pixel units).
      seeds: int64 [b, 2] per-example seeds of the random start.

    Returns:
      The last iterate, [b, H, W, C], within `eps` of `x` and in [0, 1], with no gradient.
    """
    x = tf.stop_gradient(tf.convert_to_tensor(x, tf.float32))
    adv = project(x, random_start(x, eps, seeds), eps)

    def body(i, adv):
        with tf.GradientTape() as tape:
            tape.watch(adv)
            loss = tf.reduce_sum(loss_fn(tf.cast(model_fn(adv), tf.float32)))
        grad = tape.gradient(loss, adv)
        return i + 1, project(x, adv + step_size * tf.sign(grad), eps)

    _, adv = tf.while_loop(lambda i, _: i < steps, body, (tf.constant(0), adv))
    return tf.stop_gradient(adv)


def trades_kl(clean_logits, adversarial_logits):
    """KL(p(clean) || p(adversarial)) per example, differentiable in both (TRADES' robust term)."""
    log_p = tf.nn.log_softmax(tf.cast(clean_logits, tf.float32))
    log_q = tf.nn.log_softmax(tf.cast(adversarial_logits, tf.float32))
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


def linf(x, adv):
    """Per-example L-inf size of `adv - x`."""
    return tf.reduce_max(tf.abs(tf.reshape(adv - x, [tf.shape(x)[0], -1])), axis=-1)


def robust_accuracy_fn(model_fn, eps, steps, seed):
    """A compiled check: robust accuracy of `model_fn` under PGD-`steps` against the labels.

    The attack maximises the cross-entropy (step 2.5 eps / steps, random start) and
    each example keeps its first misclassified iterate, else its last; everything is
    scored on `model_fn`'s forward pass (the real model, whatever gradient the attack
    followed). Build it once per model: each call of the result reuses its graph.

    Args:
      model_fn: images -> logits.
      eps: L-inf budget.
      steps: PGD steps.
      seed: int seed of the random starts (one per example index).

    Returns:
      `check(x, y)` for float32 [n, H, W, C] images in [0, 1] and int32 [n] labels,
      returning a dict of floats: "accuracy" (robust), "clean_accuracy",
      "perturbation_linf" (mean L-inf of the kept iterates) and "eps".
    """
    step_size = PGD_STEP_FACTOR * eps / steps

    @tf.function
    def run(x, y):
        n = tf.shape(x, out_type=tf.int64)[0]
        seeds = tf.stack([tf.fill([n], tf.constant(seed, tf.int64)), tf.range(n)], 1)
        correct = tf.equal(tf.argmax(model_fn(x), -1, output_type=tf.int32), y)
        adv = project(x, random_start(x, eps, seeds), eps)

        def body(i, adv, robust, kept):
            with tf.GradientTape() as tape:
                tape.watch(adv)
                logits = tf.cast(model_fn(adv), tf.float32)
                loss = tf.reduce_sum(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
                )
            fooled = tf.not_equal(tf.argmax(logits, -1, output_type=tf.int32), y)
            kept = tf.where(tf.logical_and(robust, fooled)[:, None, None, None], adv, kept)
            robust = tf.logical_and(robust, tf.logical_not(fooled))
            grad = tape.gradient(loss, adv)
            # After the last evaluation `adv` is not moved: it is the last iterate scored.
            adv = tf.cond(
                i < steps, lambda: project(x, adv + step_size * tf.sign(grad), eps), lambda: adv
            )
            return i + 1, adv, robust, kept

        # steps + 1 evaluations: the random start, then the iterate after each step.
        _, adv, robust, kept = tf.while_loop(
            lambda i, *_: i <= steps, body, (tf.constant(0), adv, correct, x)
        )
        kept = tf.where(robust[:, None, None, None], adv, kept)
        return (
            tf.reduce_mean(tf.cast(correct, tf.float32)),
            tf.reduce_mean(tf.cast(robust, tf.float32)),
            tf.reduce_mean(linf(x, kept)),
        )

    def check(x, y):
        clean, robust, size = run(tf.convert_to_tensor(x, tf.float32), tf.cast(y, tf.int32))
        return {
            "accuracy": float(robust),
            "clean_accuracy": float(clean),
            "perturbation_linf": float(size),
            "eps": float(eps),
        }

    return check
