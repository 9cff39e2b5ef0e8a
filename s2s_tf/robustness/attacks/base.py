"""Shared pieces of the attacks: norms, projection, random starts, losses.

Every model here is a `model_fn` mapping float32 images in [0, 1] to logits, and
every budget `eps` is in pixel units of that space (e.g. 8/255 for L-inf).
"""

import numpy as np
import tensorflow as tf
from cleverhans.tf2.utils import clip_eta

LINF = "linf"
L2 = "l2"
ORD = {LINF: np.inf, L2: 2}


def logits(model_fn, x):
    """The model's logits as float32 (mixed-precision models return float16)."""
    return tf.cast(model_fn(x), tf.float32)


def loss_gradient(model_fn, x, y, targeted):
    """Gradient of the cross-entropy (negated when targeted) with respect to `x`."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits(model_fn, x))
        if targeted:
            loss = -loss
    return tape.gradient(loss, x)


def project(x, adv, eps, norm, clip_min, clip_max):
    """Projects `adv` onto the `norm` ball of radius `eps` around `x` and the clip range."""
    return tf.clip_by_value(x + clip_eta(adv - x, ORD[norm], eps), clip_min, clip_max)


def random_start(x, eps, norm, seed):
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


def prepare(x, y, eps, seed):
    """Converts an attack's arguments to tensors: (x, y, eps, seed)."""
    x = tf.convert_to_tensor(x, tf.float32)
    seed = tf.convert_to_tensor((0, 0) if seed is None else seed, tf.int64)
    return x, tf.convert_to_tensor(y, tf.int32), tf.cast(eps, tf.float32), seed
