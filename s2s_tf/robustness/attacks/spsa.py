"""SPSA (Uesato et al. 2018): gradient-free L-inf attack, through the CleverHans shim."""

import tensorflow as tf

from s2s_tf.robustness import cleverhans_shim
from s2s_tf.robustness.attacks import base
from s2s_tf.robustness.attacks import registry


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
    x, y, eps, _ = base.prepare(x, y, eps, None)

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


registry.register(
    "spsa",
    registry.AttackSpec(
        spsa,
        base.LINF,
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
        own_schedule=True,
    ),
)
