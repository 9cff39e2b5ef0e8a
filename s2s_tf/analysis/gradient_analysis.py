"""Input-gradient analysis: how much class-specific signal do a model's gradients carry?

The S2SNet paper argues that gradients taken through its autoencoder lose their
class-specific content and follow low-level image structure (edges) instead.
For any `model_fn` mapping float32 images in [0, 1] to logits, this measures
`class_specificity` (mean pairwise cosine similarity of the gradients of
different class logits: high = little class-specific signal),
`structure_alignment` (correlation of |gradient| with the Sobel edge
magnitude: high = the gradient follows edges) and `gradient_statistics`
(moments, percentiles and a histogram to plot). Pure functions: no file I/O,
no plotting. Gradient `tf.function`s are cached per model and traced once per
image shape. Per-example gradients come from summed losses and logits, which
assumes examples do not interact (true for Keras models in inference mode).
"""

import inspect
import weakref

import numpy as np
import tensorflow as tf

from s2s_tf.train import losses

CLASS_GRADIENT_METHODS = ("batch_jacobian", "loop")

# owner (the model, or a bound method's instance) -> {key: tf.function}.
_FN_CACHE = weakref.WeakKeyDictionary()


def _cached_fn(model_fn, body, signature, *options):
    """The cached `tf.function(input_signature=signature)` of `body(model, *args, *options)`.

    The tf.function holds only a weak reference to the model, so the cache
    entry (keyed weakly on the model) does not keep the model alive. A bound
    method is keyed on its instance, since `model.__call__` is a new object on
    every attribute access. Callables that allow no weak reference are not
    cached. The signature's batch dimension is None, so a partial last batch
    does not retrace.
    """
    owner, func = model_fn, None
    if inspect.ismethod(model_fn):
        owner, func = model_fn.__self__, model_fn.__func__
    try:
        owner_ref = weakref.ref(owner)
    except TypeError:  # not weakly referable: traced afresh on every call
        return tf.function(
            lambda *args: body(model_fn, *args, *options), input_signature=list(signature)
        )

    def traced(*args):
        # Runs only while tracing; the traced graph captures the model's variables.
        target = owner_ref()
        return body(target if func is None else func.__get__(target), *args, *options)

    per_owner = _FN_CACHE.setdefault(owner, {})
    key = (func, body, tuple(signature), options)
    if key not in per_owner:
        per_owner[key] = tf.function(traced, input_signature=list(signature))
    return per_owner[key]


def _loss_gradients_body(model, x, labels):
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = tf.cast(model(x), tf.float32)
        # Summing is exact for per-example gradients: loss i depends only on image i.
        loss = tf.reduce_sum(losses.cross_entropy(labels, logits))
    return tape.gradient(loss, x), logits


def _logits_body(model, x):
    return tf.cast(model(x), tf.float32)


def _class_gradients_body(model, x, classes, method):
    with tf.GradientTape(persistent=method == "loop") as tape:
        tape.watch(x)
        logits = tf.cast(model(x), tf.float32)
        selected = tf.gather(logits, classes, batch_dims=1)  # [B, K]
    if method == "batch_jacobian":
        return tape.batch_jacobian(selected, x)
    # One backward pass per class, reusing the forward pass; the one-hot output
    # gradient picks logit k of every example at once.
    num_selected = classes.shape[1]
    grads = []
    for k in range(num_selected):
        seed = tf.broadcast_to(tf.one_hot(k, num_selected), tf.shape(selected))
        grads.append(tape.gradient(selected, x, output_gradients=seed))
    return tf.stack(grads, axis=1)


def _image_spec(images):
    return tf.TensorSpec((None, *images.shape[1:]), tf.float32)


def _run_batched(fn, batch_size, *arrays):
    """Calls `fn` on batches of `arrays` and concatenates its (nested) outputs as numpy."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    outputs = [
        fn(*(tf.constant(a[i : i + batch_size]) for a in arrays))
        for i in range(0, len(arrays[0]), batch_size)
    ]
    return tf.nest.map_structure(
        lambda *parts: np.concatenate([p.numpy() for p in parts]), *outputs
    )


def _as_images(images):
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    return images


def input_gradients(model_fn, images, labels, batch_size=32, return_logits=False):
    """Gradients of the per-example cross-entropy w.r.t. the input images.

    Args:
      model_fn: callable mapping float32 [B, H, W, C] images in [0, 1] to logits.
      images: [N, H, W, C] images.
      labels: [N] integer labels.
      batch_size: images per gradient computation.
      return_logits: also return the logits (from the same forward pass).

    Returns:
      [N, H, W, C] float32 numpy array, entry i = d loss_i / d images[i]; with
      return_logits, a tuple (gradients, [N, num_classes] float32 logits).
    """
    images = _as_images(images)
    labels = np.asarray(labels, dtype=np.int32).reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    signature = (_image_spec(images), tf.TensorSpec((None,), tf.int32))
    grad_fn = _cached_fn(model_fn, _loss_gradients_body, signature)
    grads, logits = _run_batched(grad_fn, batch_size, images, labels)
    return (grads, logits) if return_logits else grads


def predict_logits(model_fn, images, batch_size=32):
    """The [N, num_classes] float32 logits of `model_fn`, computed in batches."""
    images = _as_images(images)
    logits_fn = _cached_fn(model_fn, _logits_body, (_image_spec(images),))
    return _run_batched(logits_fn, batch_size, images)


def top_k_classes(model_fn, images, k, batch_size=32):
    """The [N, k] int32 indices of each image's k largest logits, largest first."""
    logits = predict_logits(model_fn, images, batch_size)
    return tf.math.top_k(logits, k=k).indices.numpy()


def _resolve_classes(model_fn, images, classes, num_classes):
    """Normalises the class selection to an [N, K] int32 array."""
    if classes is not None and num_classes is not None:
        raise ValueError("give classes or num_classes, not both")
    if classes is None:
        if num_classes is None:
            num_classes = predict_logits(model_fn, images[:1]).shape[-1]
        classes = np.arange(num_classes)
    classes = np.asarray(classes, dtype=np.int32)
    if classes.ndim == 1:
        classes = np.broadcast_to(classes, (len(images), len(classes)))
    if classes.ndim != 2 or len(classes) != len(images):
        raise ValueError(f"classes must be [K] or [N={len(images)}, K], got {classes.shape}")
    return classes


def class_logit_gradients(
    model_fn, images, classes=None, num_classes=None, batch_size=8, method="loop"
):
    """Gradients of several class logits w.r.t. each input image.

    Args:
      model_fn: callable mapping float32 [B, H, W, C] images in [0, 1] to logits.
      images: [N, H, W, C] images.
      classes: the logits to differentiate: [K] class indices shared by all
        images, or [N, K] per-image indices (e.g. from `top_k_classes`).
        Default: the first `num_classes` classes, or all of them.
      num_classes: with `classes` unset, use classes 0 .. num_classes - 1.
      batch_size: images per computation; memory grows with batch_size * K.
      method: "batch_jacobian" (`GradientTape.batch_jacobian`, vectorised over
        the K logits) or "loop" (one backward pass per logit). Both give the
        same numbers; which is faster depends on the model and K.

    Returns:
      [N, K, H, W, C] float32 numpy array; entry [i, k] is
      d logits[i, classes[i, k]] / d images[i].

    Raises:
      ValueError: for an unknown method or badly shaped classes.
    """
    if method not in CLASS_GRADIENT_METHODS:
        raise ValueError(f"method must be one of {CLASS_GRADIENT_METHODS}, got {method!r}")
    images = _as_images(images)
    classes = _resolve_classes(model_fn, images, classes, num_classes)
    signature = (_image_spec(images), tf.TensorSpec((None, classes.shape[1]), tf.int32))
    grad_fn = _cached_fn(model_fn, _class_gradients_body, signature, method)
    return _run_batched(grad_fn, batch_size, images, classes)


def _summary(per_image):
    values = np.asarray(per_image, dtype=np.float64)
    return {"per_image": values.tolist(), "mean": float(values.mean()), "std": float(values.std())}


def class_specificity(grads_per_class, eps=1e-12):
    """Mean pairwise cosine similarity between the gradients of different class logits.

    A value near 1 means every class logit pulls the input the same way, i.e.
    the gradient carries little class-specific information; near 0 means the
    classes' gradients are unrelated. Anti-parallel gradients count as -1
    (the similarity is signed).

    Args:
      grads_per_class: [N, K, ...] gradients, K >= 2, e.g. from
        `class_logit_gradients`.
      eps: guards the normalisation; an all-zero gradient has similarity 0
        with everything.

    Returns:
      {"per_image": [N] floats, "mean": float, "std": float} (plain Python).

    Raises:
      ValueError: when fewer than two classes are given.
    """
    grads = np.asarray(grads_per_class, dtype=np.float64)
    if grads.ndim < 3 or grads.shape[1] < 2:
        raise ValueError(f"need [N, K>=2, ...] gradients, got shape {grads.shape}")
    num, k = grads.shape[:2]
    flat = grads.reshape(num, k, -1)
    unit = flat / np.maximum(np.linalg.norm(flat, axis=-1, keepdims=True), eps)
    gram = np.einsum("nkd,njd->nkj", unit, unit)
    # Mean over the K * (K - 1) off-diagonal entries: each unordered pair
    # appears twice, which leaves the mean unchanged.
    off_diagonal = gram.sum(axis=(1, 2)) - np.trace(gram, axis1=1, axis2=2)
    return _summary(off_diagonal / (k * (k - 1)))


def sobel_edge_magnitude(images):
    """Per-pixel Sobel edge magnitude of the grayscale image.

    Args:
      images: [N, H, W, C] images, C = 1 or 3 (RGB, converted to grayscale).

    Returns:
      [N, H, W] float32 tf.Tensor, sqrt(dy^2 + dx^2). Differentiable, so it can
      also be used inside a model.
    """
    images = tf.convert_to_tensor(images, tf.float32)
    gray = tf.image.rgb_to_grayscale(images) if images.shape[-1] == 3 else images
    if gray.shape[-1] != 1:
        raise ValueError(f"images need 1 or 3 channels, got {images.shape[-1]}")
    edges = tf.image.sobel_edges(gray)[..., 0, :]  # [N, H, W, 2]: (dy, dx)
    # The epsilon keeps the gradient of sqrt finite on flat regions.
    return tf.sqrt(tf.reduce_sum(tf.square(edges), axis=-1) + 1e-12)


def _pearson_per_row(a, b):
    """Pearson correlation of each row pair; 0 where a row is constant (undefined)."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    safe = np.where(denom > 0, denom, 1.0)
    return np.where(denom > 0, (a * b).sum(axis=1) / safe, 0.0)


def structure_alignment(grads, images):
    """Per image, the Pearson correlation between |gradient| and the Sobel edge magnitude.

    High values mean the gradient's energy sits on the image's edges, i.e. it
    follows low-level structure. A constant |gradient| or a constant image has
    no defined correlation and scores 0.

    Args:
      grads: [N, H, W, C] input gradients.
      images: [N, H, W, C] the images the gradients were taken at.

    Returns:
      {"per_image": [N] floats, "mean": float, "std": float} (plain Python).
    """
    grads = np.asarray(grads, dtype=np.float64)
    if grads.shape != np.shape(images):
        raise ValueError(f"grads {grads.shape} and images {np.shape(images)} differ in shape")
    saliency = np.abs(grads).sum(axis=-1).reshape(len(grads), -1)
    edges = sobel_edge_magnitude(images).numpy().astype(np.float64).reshape(len(grads), -1)
    return _summary(_pearson_per_row(saliency, edges))


def gradient_statistics(
    grads,
    bins=101,
    range_percentile=99.5,
    percentiles=(0.1, 1, 5, 25, 50, 75, 95, 99, 99.9),
    zero_rtol=1e-3,
):
    """Summary statistics and a histogram of a set of gradients.

    Args:
      grads: [N, ...] gradients, one row per image.
      bins: number of histogram bins.
      range_percentile: the histogram spans [-r, r] with r this percentile of
        |g|, so a few huge entries do not squash the plot; entries outside are
        counted in the end bins, so the counts always sum to the entry count.
      percentiles: percentiles of g to report.
      zero_rtol: an entry is "near zero" when |g| <= zero_rtol * max |g|.
        Relative, so models whose gradients differ in scale compare fairly.

    Returns:
      A plain-Python dict: "mean", "std", "mean_abs", "max_abs",
      "l2_norm_mean" / "l2_norm_std" (of the per-image L2 norms), "kurtosis"
      (Pearson's, not excess: 3 for a normal distribution, larger for heavy
      tails; 0 when all entries are equal), "near_zero_fraction",
      "num_entries", "percentiles" ({str(p): value}) and "histogram"
      ({"edges": bins + 1 floats, "counts": bins ints, "range": r}).
    """
    grads = np.asarray(grads, dtype=np.float64)
    flat, abs_g = grads.reshape(-1), np.abs(grads.reshape(-1))
    mean, std, max_abs = flat.mean(), flat.std(), abs_g.max()
    kurtosis = np.mean((flat - mean) ** 4) / std**4 if std > 0 else 0.0
    norms = np.linalg.norm(grads.reshape(len(grads), -1), axis=1)
    half_range = float(np.percentile(abs_g, range_percentile))
    if half_range <= 0:  # all (or nearly all) zeros: any positive range shows them
        half_range = float(max_abs) if max_abs > 0 else 1.0
    clipped = np.clip(flat, -half_range, half_range)
    counts, edges = np.histogram(clipped, bins=bins, range=(-half_range, half_range))
    return {
        "mean": float(mean),
        "std": float(std),
        "mean_abs": float(abs_g.mean()),
        "max_abs": float(max_abs),
        "l2_norm_mean": float(norms.mean()),
        "l2_norm_std": float(norms.std()),
        "kurtosis": float(kurtosis),
        "near_zero_fraction": float(np.mean(abs_g <= zero_rtol * max_abs)),
        "num_entries": int(flat.size),
        "percentiles": {
            str(p): float(v)
            for p, v in zip(percentiles, np.percentile(flat, percentiles), strict=True)
        },
        "histogram": {
            "edges": edges.tolist(),
            "counts": counts.astype(int).tolist(),
            "range": half_range,
        },
    }


def _class_specificity_in_chunks(model_fn, images, classes, batch_size, method):
    """`class_specificity` over all images without holding every [N, K, ...] gradient."""
    per_image = []
    for start in range(0, len(images), batch_size):
        batch = slice(start, start + batch_size)
        grads = class_logit_gradients(
            model_fn, images[batch], classes[batch], batch_size=batch_size, method=method
        )
        per_image.extend(class_specificity(grads)["per_image"])
    return _summary(per_image)


def _model_report(model_fn, images, labels, options):
    """Metrics of one model (plain Python) and its loss gradients (numpy)."""
    grads, logits = input_gradients(
        model_fn, images, labels, options["batch_size"], return_logits=True
    )
    if options["top_k"]:
        classes = tf.math.top_k(logits, k=options["top_k"]).indices.numpy()
    else:
        classes = _resolve_classes(model_fn, images, options["classes"], options["num_classes"])
    metrics = {
        "accuracy": float(np.mean(np.argmax(logits, axis=-1) == labels)),
        "mean_loss": float(np.mean(losses.cross_entropy(labels, logits).numpy())),
        "loss_gradient_statistics": gradient_statistics(grads, bins=options["bins"]),
        "structure_alignment": structure_alignment(grads, images),
        "class_specificity": _class_specificity_in_chunks(
            model_fn, images, classes, options["class_batch_size"], options["method"]
        ),
        "num_classes_compared": int(classes.shape[1]),
    }
    return metrics, grads


def compare_models(
    models,
    images,
    labels,
    num_classes=None,
    classes=None,
    top_k=None,
    batch_size=32,
    class_batch_size=8,
    method="loop",
    bins=101,
    num_examples=4,
):
    """Runs the whole gradient analysis for several models on the same images.

    Args:
      models: dict name -> model_fn, e.g. {"classifier": c, "defended": s2s}.
      images: [N, H, W, C] float32 images in [0, 1].
      labels: [N] integer labels.
      num_classes: compare the gradients of logits 0 .. num_classes - 1
        (default: all). The cost grows linearly with it: keep it small for
        ImageNet-sized outputs, or use top_k.
      classes: instead, [K] or [N, K] class indices (see `class_logit_gradients`).
      top_k: instead, each model's own k highest-scoring classes per image.
      batch_size: images per loss-gradient computation.
      class_batch_size: images per class-gradient computation.
      method: "batch_jacobian" or "loop", see `class_logit_gradients`.
      bins: histogram bins of `gradient_statistics`.
      num_examples: how many of the first images to return raw gradients for.

    Returns:
      {"metrics": JSON-serialisable dict, "examples": dict of numpy arrays}.
      metrics = {"num_images", "image_shape", "models": {name: {"accuracy", "mean_loss",
      "loss_gradient_statistics" (see `gradient_statistics`), "structure_alignment",
      "class_specificity" ({"per_image", "mean", "std"}), "num_classes_compared"}}}.
      examples = {"images" [E, H, W, C], "labels" [E], "edge_magnitude"
      [E, H, W], "loss_gradients": {name: [E, H, W, C]}} for E = num_examples.

    Raises:
      ValueError: when more than one of num_classes, classes and top_k is set.
    """
    if sum(option is not None for option in (num_classes, classes, top_k)) > 1:
        raise ValueError("set at most one of num_classes, classes and top_k")
    images = _as_images(images)
    labels = np.asarray(labels, dtype=np.int32).reshape(-1)
    options = {"num_classes": num_classes, "classes": classes, "top_k": top_k, "bins": bins}
    options.update(batch_size=batch_size, class_batch_size=class_batch_size, method=method)
    metrics, example_grads = {}, {}
    for name, model_fn in models.items():
        metrics[name], grads = _model_report(model_fn, images, labels, options)
        example_grads[name] = grads[:num_examples]
    examples = {
        "images": images[:num_examples],
        "labels": labels[:num_examples],
        "edge_magnitude": sobel_edge_magnitude(images[:num_examples]).numpy(),
        "loss_gradients": example_grads,
    }
    summary = {"num_images": len(images), "image_shape": list(images.shape[1:])}
    return {"metrics": {**summary, "models": metrics}, "examples": examples}
