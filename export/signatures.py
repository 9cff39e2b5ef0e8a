"""Serving signatures of the defended classifier: input checks, image decoding, named outputs.

Four signatures, all batched on the first axis (so TF Serving's batching can
concatenate requests) and built from stock TensorFlow ops only:

    serving_default       images [N, H, W, 3] float32 in [0, 1] -> classification outputs
    predict_image_bytes   image_bytes [N] string (JPEG/PNG)     -> classification outputs
    purify                images                               -> purified_images in [0, 1]
    classify_undefended   images                               -> classification outputs,
                                                                  of the classifier alone

`purify` returns the autoencoder's reconstruction clipped to [0, 1], which is
exactly what the defended classifier sees (`s2s_model.build_s2s_model`), so
`classify_undefended(purify(x))` equals `serving_default(x)`.

Classification outputs: `logits` [N, K], `probabilities` [N, K] (softmax),
`classes` [N] int64 (argmax), `top_k_scores` [N, k] and `top_k_classes` [N, k]
int64, with k = min(top_k, K).

Bad input fails with InvalidArgument naming the problem; nothing is silently
reshaped. Inputs are declared with unknown shape and a loaded signature checks
only dtypes, so every shape check is an in-graph assert; the checks run in a
fixed order and the first failing one is reported:

- rank other than 4, channels other than 3, or a size other than H x W;
- NaN or Inf anywhere (always an error);
- values outside [0, 1]: clipped (`out_of_range="clip"`, the default; the
  gradient is zero where clipping is active) or rejected (`"error"`);
- image bytes that are empty, larger than `max_image_bytes`, neither JPEG nor
  PNG, corrupt, wider or higher than `max_image_size` pixels (checked from the
  header, before decoding), or decoded to a channel count other than 1
  (gray, tiled to RGB), 3 (RGB) or 4 (RGBA, alpha dropped).

An empty batch returns empty outputs. Decoded images get the evaluation view of
the training pipeline (`s2s_tf.data.preprocess_eval`): the largest central crop
with the model's aspect ratio, bilinear antialiased resize, clip to [0, 1].
"""

import dataclasses

import tensorflow as tf

from s2s_tf import constants

DEFAULT_SIGNATURE = "serving_default"
BYTES_SIGNATURE = "predict_image_bytes"
PURIFY_SIGNATURE = "purify"
UNDEFENDED_SIGNATURE = "classify_undefended"
SIGNATURE_NAMES = (DEFAULT_SIGNATURE, BYTES_SIGNATURE, PURIFY_SIGNATURE, UNDEFENDED_SIGNATURE)

IMAGES_INPUT = "images"
BYTES_INPUT = "image_bytes"
PURIFIED_OUTPUT = "purified_images"
CLASSIFICATION_OUTPUTS = ("logits", "probabilities", "classes", "top_k_scores", "top_k_classes")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_HEADER_BYTES = 24  # signature, IHDR length and tag, width and height
_ASSERT_SUMMARIZE = 8


@dataclasses.dataclass(frozen=True)
class SignatureOptions:
    """How the signatures treat their inputs.

    Attributes:
      image_size: (H, W) the model takes.
      top_k: how many classes `top_k_*` report (capped at the number of classes).
      out_of_range: "clip" or "error" for float values outside [0, 1].
      max_image_bytes: the largest encoded image accepted, in bytes.
      max_image_size: the largest height or width of an encoded image, in pixels.
    """

    image_size: tuple[int, int]
    top_k: int = 5
    out_of_range: str = "clip"
    max_image_bytes: int = 10 * 2**20
    max_image_size: int = 4096

    def validate(self):
        """Raises ValueError naming the first invalid field."""
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be two positive ints, got {self.image_size}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.out_of_range not in constants.OUT_OF_RANGE_MODES:
            raise ValueError(
                f"out_of_range must be one of {constants.OUT_OF_RANGE_MODES}, "
                f"got {self.out_of_range!r}"
            )
        if self.max_image_bytes < 1 or self.max_image_size < 1:
            raise ValueError("max_image_bytes and max_image_size must be >= 1")


def _assert(condition, *data):
    return tf.debugging.Assert(condition, list(data), summarize=_ASSERT_SUMMARIZE)


def _chain(steps):
    """Asserts (condition, *message) steps one after another; returns the last op."""
    check = None
    for condition, *data in steps:
        with tf.control_dependencies([] if check is None else [check]):
            check = _assert(condition, *data)
    return check


def _after(checks, tensor):
    """`tensor`, computed only once every op in `checks` has passed."""
    with tf.control_dependencies(checks):
        return tf.identity(tensor)


def _rank_and_shape(x):
    return tf.rank(x), tf.shape(x, out_type=tf.int32)


def _with_static_shape(x, shape):
    """Tells Python (not the graph) the shape the checks before `x` proved.

    `tf.ensure_shape` would add an op whose shape Grappler merges back into the
    input, folding `Rank`/`Shape` to constants and the checks into no-ops.
    """
    x.set_shape(shape)
    return x


def check_images(images, options):
    """Validates a float image batch in-graph and applies the out-of-range policy.

    Args:
      images: float32 tensor, nominally [N, H, W, 3] in [0, 1].
      options: `SignatureOptions`.

    Returns:
      The images, passed only after the checks ran (clipped in "clip" mode).
    """
    h, w = options.image_size
    rank, shape = _rank_and_shape(images)
    # Zero-padded to rank 4, so comparing it cannot fail whatever the rank.
    shape4 = tf.concat([shape, tf.zeros([4], tf.int32)], 0)[:4]
    check = _chain(
        (
            (tf.equal(rank, 4), f"images must be a rank-4 tensor [N, {h}, {w}, 3]; got rank", rank),
            (tf.equal(shape4[3], 3), "images must have 3 (RGB) channels; got shape", shape),
            (
                tf.reduce_all(tf.equal(shape4[1:3], [h, w])),
                f"images must be {h}x{w} pixels (height x width); got shape",
                shape,
            ),
            (tf.reduce_all(tf.math.is_finite(images)), "images contain NaN or Inf values"),
        )
    )
    if options.out_of_range == "error":
        with tf.control_dependencies([check]):
            low, high = tf.reduce_min(images), tf.reduce_max(images)
            check = _assert(
                tf.logical_and(low >= 0.0, high <= 1.0),
                "images must be in [0, 1] (out_of_range=error); got min and max",
                low,
                high,
            )
    images = _with_static_shape(_after([check], images), [None, h, w, 3])
    if options.out_of_range == "clip":
        images = tf.clip_by_value(images, 0.0, 1.0)
    return images


def _image_dims(data, head, is_jpeg):
    """(height, width) int64 from the JPEG or PNG header, without decoding the pixels."""

    def png_dims():
        raw = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)
        be32 = lambda b: ((b[0] * 256 + b[1]) * 256 + b[2]) * 256 + b[3]  # noqa: E731
        return tf.stack([be32(raw[20:24]), be32(raw[16:20])])

    def jpeg_dims():
        return tf.cast(tf.io.extract_jpeg_shape(data)[:2], tf.int64)

    return tf.cond(is_jpeg, jpeg_dims, png_dims)


def _eval_view(image, size):
    """Central crop with the aspect ratio of `size`, then resize (as `data.preprocess_eval`)."""
    h, w = size
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.minimum(shape[0] / h, shape[1] / w)
    crop = tf.cast(tf.round(tf.constant([h, w], tf.float32) * scale), tf.int32)
    crop = tf.clip_by_value(crop, 1, tf.cast(shape, tf.int32))
    offset = (tf.cast(shape, tf.int32) - crop) // 2
    image = tf.slice(image, [offset[0], offset[1], 0], [crop[0], crop[1], 3])
    image = tf.image.resize(image, size, method="bilinear", antialias=True)
    return tf.ensure_shape(tf.clip_by_value(image, 0.0, 1.0), [h, w, 3])


def _decode_one(data, index, options):
    """Checks and decodes one encoded image to float32 [H, W, 3] in [0, 1]."""

    def problem(template, *values):
        return tf.strings.format("image_bytes[{}] " + template, (index, *values))

    length = tf.strings.length(data)
    head = tf.strings.substr(
        tf.strings.join([data, tf.constant(b"\0" * _PNG_HEADER_BYTES)]), 0, _PNG_HEADER_BYTES
    )
    is_jpeg = tf.io.is_jpeg(data)
    is_png = tf.logical_and(
        tf.equal(tf.strings.substr(head, 0, 8), _PNG_SIGNATURE),
        tf.equal(tf.strings.substr(head, 12, 4), b"IHDR"),
    )
    limit, most = options.max_image_bytes, options.max_image_size
    check = _chain(
        (
            (length > 0, problem("is empty (0 bytes)")),
            (length <= limit, problem("has {} bytes; the limit is {}", length, limit)),
            (tf.logical_or(is_jpeg, is_png), problem("is not a JPEG or PNG image")),
        )
    )
    with tf.control_dependencies([check]):
        dims = _image_dims(data, head, is_jpeg)
    size_ok = _assert(
        tf.logical_and(tf.reduce_all(dims >= 1), tf.reduce_all(dims <= most)),
        problem("is {}x{} pixels; height and width must be 1 to {}", dims[0], dims[1], most),
    )
    with tf.control_dependencies([size_ok]):
        image = tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)
    channels = tf.shape(image)[2]
    channels_ok = _assert(
        tf.reduce_any(tf.equal(channels, [1, 3, 4])),
        problem("has {} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA)", channels),
    )
    image = tf.image.convert_image_dtype(_after([channels_ok], image), tf.float32)
    # Gray is tiled to RGB and alpha dropped, as the training pipeline does.
    image = tf.gather(image, tf.minimum(tf.range(3), channels - 1), axis=2)
    return _eval_view(image, options.image_size)


def decode_images(image_bytes, options):
    """Decodes a batch of JPEG/PNG strings to float32 [N, H, W, 3] in [0, 1].

    Args:
      image_bytes: string tensor [N] of encoded images.
      options: `SignatureOptions`.

    Returns:
      The decoded batch; InvalidArgument at run time names the first bad image.
    """
    rank, _ = _rank_and_shape(image_bytes)
    rank_ok = _assert(
        tf.equal(rank, 1), "image_bytes must be a rank-1 string tensor [N]; got rank", rank
    )
    image_bytes = _with_static_shape(_after([rank_ok], image_bytes), [None])
    indices = tf.range(tf.size(image_bytes, out_type=tf.int64), dtype=tf.int64)
    h, w = options.image_size
    return tf.map_fn(
        lambda args: _decode_one(args[0], args[1], options),
        (image_bytes, indices),
        fn_output_signature=tf.TensorSpec([h, w, 3], tf.float32),
    )


def classification_outputs(logits, top_k):
    """The named classification outputs of a logits batch [N, K]."""
    k = min(top_k, logits.shape[-1])
    probabilities = tf.nn.softmax(logits, axis=-1)
    top = tf.math.top_k(probabilities, k=k)
    return {
        "logits": logits,
        "probabilities": probabilities,
        "classes": tf.argmax(logits, axis=-1, output_type=tf.int64),
        "top_k_scores": top.values,
        "top_k_classes": tf.cast(top.indices, tf.int64),
    }


def _call_unless_empty(model, images, empty):
    """`model(images)`, or `empty` for an empty batch (some layers reject N = 0)."""
    return tf.cond(tf.shape(images)[0] > 0, lambda: model(images, training=False), lambda: empty)


def serving_endpoints(defended, purifier, classifier, options):
    """The serving functions and their input signatures.

    Args:
      defended: [0, 1] images -> logits (`s2s_model.build_s2s_model`).
      purifier: [0, 1] images -> reconstructions clipped to [0, 1]
        (`s2s_model.build_purifier`), the images `defended`'s classifier sees.
      classifier: [0, 1] images -> logits, without the autoencoder.
      options: `SignatureOptions`.

    Returns:
      A dict {signature name: (function, [input TensorSpec])}, `serving_default` first.
    """
    options.validate()
    h, w = options.image_size
    num_classes = defended.output_shape[-1]
    # Unknown rank on purpose: a server feeds tensors of any shape regardless of the
    # declared one, and a declared shape lets Grappler fold the rank and shape checks
    # above into constants. The checks give every input its static shape back.
    images_spec = [tf.TensorSpec(None, tf.float32, name=IMAGES_INPUT)]
    bytes_spec = [tf.TensorSpec(None, tf.string, name=BYTES_INPUT)]

    def classify(model, x):
        logits = _call_unless_empty(model, x, tf.zeros([0, num_classes], tf.float32))
        return classification_outputs(logits, options.top_k)

    def serve(images):
        return classify(defended, check_images(images, options))

    def predict_image_bytes(image_bytes):
        return classify(defended, decode_images(image_bytes, options))

    def purify(images):
        x = check_images(images, options)
        return {PURIFIED_OUTPUT: _call_unless_empty(purifier, x, x)}

    def classify_undefended(images):
        return classify(classifier, check_images(images, options))

    return {
        DEFAULT_SIGNATURE: (serve, images_spec),
        BYTES_SIGNATURE: (predict_image_bytes, bytes_spec),
        PURIFY_SIGNATURE: (purify, images_spec),
        UNDEFENDED_SIGNATURE: (classify_undefended, images_spec),
    }
