"""Per-example losses and image metrics of the training stages.

Each loss returns one value per example, so the trainer can average it over the
global batch (`tf.nn.compute_average_loss`) whatever the number of replicas.
"""

import tensorflow as tf

RECONSTRUCTION_LOSSES = ("mse", "l1")
STAGE2_LOSSES = ("kl", "xent")


def reconstruction_loss(target, reconstruction, kind="mse"):
    """Mean squared (or absolute) error per example, over pixels and channels.

    Args:
      target: [B, H, W, C] images.
      reconstruction: [B, H, W, C] reconstructions in the same space.
      kind: "mse" or "l1".

    Returns:
      [B] float32 losses.
    """
    if kind not in RECONSTRUCTION_LOSSES:
        raise ValueError(
            f"reconstruction loss must be one of {RECONSTRUCTION_LOSSES}, got {kind!r}"
        )
    diff = tf.cast(reconstruction, tf.float32) - tf.cast(target, tf.float32)
    per_pixel = tf.square(diff) if kind == "mse" else tf.abs(diff)
    return tf.reduce_mean(per_pixel, axis=[1, 2, 3])


def cross_entropy(labels, logits):
    """Softmax cross-entropy per example from integer labels and logits."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32)
    )


def kl_to_reference(reference_logits, logits):
    """KL(p_ref || p) per example, with p_ref = softmax(reference_logits) held fixed.

    Stage 2 with unlabelled data: the decoder learns to make the classifier
    answer on the reconstruction as it does on the clean image.
    """
    reference = tf.stop_gradient(tf.cast(reference_logits, tf.float32))
    log_p_ref = tf.nn.log_softmax(reference)
    log_p = tf.nn.log_softmax(tf.cast(logits, tf.float32))
    return tf.reduce_sum(tf.exp(log_p_ref) * (log_p_ref - log_p), axis=-1)


def psnr(images, reconstructions, max_value=1.0):
    """Peak signal-to-noise ratio per example in dB, for images in [0, max_value].

    The reconstruction is clipped to the valid range first, as a viewer would.
    A perfect reconstruction gives 100 dB rather than infinity, so averages of
    PSNR stay finite.
    """
    clipped = tf.clip_by_value(tf.cast(reconstructions, tf.float32), 0.0, max_value)
    mse = tf.reduce_mean(tf.square(tf.cast(images, tf.float32) - clipped), axis=[1, 2, 3])
    mse = tf.maximum(mse, 1e-10 * max_value**2)
    return 10.0 * tf.math.log(max_value**2 / mse) / tf.math.log(10.0)


def correct(labels, logits):
    """1.0 where the arg-max of `logits` equals the label, else 0.0 (per example)."""
    predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.cast(tf.equal(predictions, tf.cast(labels, tf.int32)), tf.float32)
