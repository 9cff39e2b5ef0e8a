"""Runs the registered adversarial attacks in compiled, cached batches.

Every model here is a `model_fn` mapping float32 images in [0, 1] to logits, and
every budget `eps` is in pixel units of that space (e.g. 8/255 for L-inf). The
attacks and their registry live in `s2s_tf.robustness.attacks`.

`run_attack` is the entry point for evaluation: it batches, compiles the
per-batch attack once per (model object, attack, static parameters) and caches
it, so calls with the same model (and any `eps`, `step_size` or seed) do not
retrace. Pass the same model object each time; a fresh lambda per call cannot
be cached. It also runs restarts and enforces the budget on the result (for
`cw_l2`'s budget see `s2s_tf.robustness.attacks.cw_l2`).

`accuracy` evaluates a model with the same cached compilation, and
`bpda_model_fn` wraps a purifier and a classifier for BPDA attacks.
"""

import weakref

import numpy as np
import tensorflow as tf

from s2s_tf.robustness.attacks import enforce_budget
from s2s_tf.robustness.attacks import get_spec

DEFAULT_BATCH_SIZE = 128


def _graph_runner(fn, model_fn, **static):
    """Wraps a graph-compatible attack function in one `tf.function`."""

    def attack(x, y, eps, step_size, seed):
        return fn(model_fn, x, y, eps, step_size=step_size, seed=seed, **static)

    # reduce_retracing: a second batch shape traces once with an unknown batch size,
    # which then serves every batch size.
    return tf.function(attack, reduce_retracing=True)


# model_fn -> {static parameters: compiled function}. Weak keys: the cache dies
# with the model; the compiled functions reach the model through a weak reference.
_CACHE = weakref.WeakKeyDictionary()


def _cache_for(model_fn):
    try:
        return _CACHE.setdefault(model_fn, {})
    except TypeError:  # not weakly referenceable: compile per call
        return {}


def _weak_model_fn(model_fn):
    try:
        ref = weakref.ref(model_fn)
    except TypeError:
        return model_fn

    def call(x):
        model = ref()
        if model is None:
            raise RuntimeError("The model of this compiled attack no longer exists.")
        return model(x)

    return call


def compiled_attack(
    name, model_fn, *, steps=None, targeted=False, clip_min=0.0, clip_max=1.0, **params
):
    """Returns the cached compiled per-batch attack of `model_fn`.

    Args:
      name: a key of `ATTACKS`.
      model_fn: the model (cached on this object's identity).
      steps: iterations; default the spec's.
      targeted: whether `y` holds target labels.
      clip_min: lowest pixel value.
      clip_max: highest pixel value.
      **params: attack parameters overriding the spec's defaults.

    Returns:
      `attack(x, y, eps, step_size, seed) -> adversarial x`, a `tf.function`
      (except for CW) that traces once per input shape; pass tensors.

    Raises:
      ValueError: for an unknown attack or parameter.
    """
    spec = get_spec(name)
    unknown = set(params) - set(spec.params)
    if unknown:
        raise ValueError(
            f"{name} has no parameters {sorted(unknown)}; it has {sorted(spec.params)}."
        )
    params = {**spec.params, **params}
    steps = spec.defaults.get("steps") if steps is None else int(steps)
    static = dict(
        steps=steps,
        targeted=bool(targeted),
        clip_min=float(clip_min),
        clip_max=float(clip_max),
        **params,
    )
    key = (name, tuple(sorted(static.items())))
    cache = _cache_for(model_fn)
    if key not in cache:
        weak_fn = _weak_model_fn(model_fn)
        if spec.runner is not None:
            cache[key] = spec.runner(weak_fn, **static)
        else:
            cache[key] = _graph_runner(spec.fn, weak_fn, **static)
    return cache[key]


def _logits_fn(model_fn):
    cache = _cache_for(model_fn)
    if "logits" not in cache:
        weak_fn = _weak_model_fn(model_fn)
        cache["logits"] = tf.function(
            lambda x: tf.cast(weak_fn(x), tf.float32), reduce_retracing=True
        )
    return cache["logits"]


def _gradient_fn(model_fn):
    """The compiled input gradient of the cross-entropy of `model_fn` (cached per model).

    Compiled once, not run eagerly: a streaming evaluation checks the gradient of
    every threat model on every shard, and the eager pass cost more than the
    shard's forward passes on small models.
    """
    cache = _cache_for(model_fn)
    if "gradient" not in cache:
        weak_fn = _weak_model_fn(model_fn)

        def gradient(x, y):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
                    y, tf.cast(weak_fn(x), tf.float32)
                )
            return tape.gradient(loss, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)

        cache["gradient"] = tf.function(gradient, reduce_retracing=True)
    return cache["gradient"]


def _even_batches(arrays, batch_size):
    """Yields (start, stop, [a[start:stop] for a in arrays]), batches of <= `batch_size` rows.

    The rows are split evenly (117 rows in batches of 100: 59 + 58, not 100 + 17
    padded to 100, which would attack 83 copies for nothing). The compiled
    functions are `reduce_retracing`: a second batch size traces once more, with
    an unknown batch size, and no size after it traces again.
    """
    n = len(arrays[0])
    count = -(-n // batch_size)
    size = -(-n // count) if count else batch_size
    for start in range(0, n, size):
        stop = min(start + size, n)
        yield start, stop, [a[start:stop] for a in arrays]


def _score(model_fn, adv, y, targeted):
    """Per example: (fooled / reached the target, loss the attack maximises)."""
    logits = _logits_fn(model_fn)(tf.constant(adv)).numpy().astype(np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    cross_entropy = -log_probs[np.arange(len(y)), y]
    pred = logits.argmax(-1)
    if targeted:
        return pred == y, -cross_entropy
    return pred != y, cross_entropy


def _check_args(spec, images, labels, eps, restarts, targeted, target_labels, clip_min, clip_max):
    if images.ndim < 2 or len(labels) != len(images):
        raise ValueError(
            f"images must be [N, ...] with N labels, got {images.shape} and {labels.shape}."
        )
    if eps is None:
        if spec.eps_policy != "reject":
            raise ValueError("eps=None (no budget) is only meaningful for cw_l2.")
    elif not np.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}.")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}.")
    if targeted and (target_labels is None or len(target_labels) != len(images)):
        raise ValueError("A targeted attack needs one target label per image.")
    if not targeted and target_labels is not None:
        raise ValueError("target_labels given for an untargeted attack; pass targeted=True.")
    if images.size and (images.min() < clip_min or images.max() > clip_max):
        raise ValueError(f"images must lie in [clip_min, clip_max] = [{clip_min}, {clip_max}].")


def step_size_for(spec, eps, steps, step_size=None):
    """The step size to pass, or None to let the attack choose (APGD's 2 * eps, Square)."""
    if step_size is not None:
        return float(step_size)
    if "step_size" in spec.defaults:
        return float(spec.defaults["step_size"])
    if "step_size_factor" in spec.defaults:
        return spec.defaults["step_size_factor"] * eps / steps
    return None


def example_seeds(seed, index, run):
    """Stateless seeds [b, 2] of one run (restart): one per example, from its index.

    An example's random start depends on (seed, its index in `images`, run) only,
    not on the batch it lands in, so results do not change with the batch size
    or the number of replicas sharing the examples (`sharded` uses the same seeds).

    Args:
      seed: the attack's int seed.
      index: int [b], the examples' indices.
      run: the restart number.
    """
    index = tf.cast(index, tf.int64)
    return tf.stack([tf.fill(tf.shape(index), tf.cast(seed, tf.int64)), index + (run << 32)], -1)


def _strongest(runs, model_fn, y, targeted):
    """Per example, the first of `runs` that succeeds, else the one with the highest loss.

    Args:
      runs: iterable of adversarial batches (numpy) of the same clean batch.
      model_fn: the attacked model.
      y: int array of the attack's labels (true labels, or targets if `targeted`).
      targeted: whether success means reaching the target label.

    Returns:
      The combined adversarial batch.
    """
    best = best_success = best_loss = None
    for adv in runs:
        success, loss = _score(model_fn, adv, y, targeted)
        if best is None:
            best, best_success, best_loss = adv, success, loss
            continue
        better = (success & ~best_success) | ((success == best_success) & (loss > best_loss))
        best[better], best_success[better], best_loss[better] = (
            adv[better],
            success[better],
            loss[better],
        )
    return best


def run_attack(
    name,
    model_fn,
    images,
    labels,
    eps,
    *,
    steps=None,
    step_size=None,
    restarts=1,
    targeted=False,
    target_labels=None,
    batch_size=None,
    seed=0,
    clip_min=0.0,
    clip_max=1.0,
    progress=None,
    indices=None,
    **overrides,
):
    """Attacks `images` with a registered attack and returns the adversarial images.

    Untargeted attacks push away from the true `labels`; targeted ones towards
    `target_labels`. The result always lies in [clip_min, clip_max] and within
    `eps` of the input in the attack's norm (enforced exactly at the end; for
    `cw_l2` see the module docstring), so `eps=0` returns the input unchanged.

    Args:
      name: a key of `ATTACKS`.
      model_fn: callable [N, H, W, C] images in [clip_min, clip_max] -> logits,
        typically a Keras model. Compiled attacks are cached on its identity.
      images: float array [N, H, W, C] in [clip_min, clip_max].
      labels: int array [N] of true labels.
      eps: the budget in pixel units, in the attack's norm (`ATTACKS[name].norm`).
      steps: iterations (default the spec's: 10 for bim/pgd/pgd_l2/mim; 40 SPSA
        updates of 64 forward passes each, stopping early once an example is
        adversarial; 100 Adam steps per CW binary-search step).
      step_size: step per iteration; default 2.5 * eps / steps for bim, pgd and
        pgd_l2, eps / steps for mim, Adam's learning rate 0.01 for spsa and cw_l2.
      restarts: runs with different random starts; per example the first run
        that fools the model (reaches the target) is kept, else the one with the
        highest loss. Deterministic attacks run once.
      targeted: attack towards `target_labels`.
      target_labels: int array [N], required when `targeted`.
      batch_size: images per compiled call at most (default 128); the images
        are split into batches of equal size (to one image).
      seed: seed of the random starts; the same seed gives the same result
        (SPSA excepted: it draws from TF's global generator).
      clip_min: lowest pixel value.
      clip_max: highest pixel value.
      progress: optional callable(done, total) told after each batch, for
        progress bars.
      indices: int [N], each example's index for its random start (default
        0..N-1): pass the examples' indices in the whole evaluation when
        attacking a subset, so each example gets the same start as in a run
        on every example.
      **overrides: attack parameters, e.g. decay_factor=0.5 for mim or
        binary_search_steps=9 for cw_l2 (see `ATTACKS[name].defaults`).

    Returns:
      float32 array shaped like `images`.

    Raises:
      ValueError: for an unknown attack or parameter, a negative eps, images out
        of range, or inconsistent labels.
    """
    spec = get_spec(name)
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels).reshape(-1).astype(np.int32)
    _check_args(spec, images, labels, eps, restarts, targeted, target_labels, clip_min, clip_max)
    attack_labels = np.asarray(target_labels).astype(np.int32) if targeted else labels
    runner = compiled_attack(
        name,
        model_fn,
        steps=steps,
        targeted=targeted,
        clip_min=clip_min,
        clip_max=clip_max,
        **overrides,
    )
    if len(images) == 0:
        return images.copy()
    steps = spec.defaults.get("steps") if steps is None else steps
    eps_t = tf.constant(np.inf if eps is None else eps, tf.float32)
    step = step_size_for(spec, 0.0 if eps is None else eps, steps, step_size)
    step_t = None if step is None else tf.constant(step, tf.float32)
    n_runs = restarts if spec.stochastic else 1
    batch_size = min(batch_size or DEFAULT_BATCH_SIZE, len(images))
    indices = np.arange(len(images)) if indices is None else np.asarray(indices, np.int64)
    if indices.shape != (len(images),):
        raise ValueError(f"indices must have one entry per image, got shape {indices.shape}")
    out = np.empty_like(images)
    batches = _even_batches((images, attack_labels), batch_size)
    for start, stop, (x, y) in batches:
        x_t, y_t = tf.constant(x), tf.constant(y)
        # Lazy generators: each run is scored before the next one starts.
        index = indices[start:stop]
        seeds = (example_seeds(seed, index, run) for run in range(n_runs))
        advs = (np.asarray(runner(x_t, y_t, eps_t, step_t, seed_t)) for seed_t in seeds)
        runs = (enforce_budget(spec, x, adv, eps, clip_min, clip_max) for adv in advs)
        best = next(runs) if n_runs == 1 else _strongest(runs, model_fn, y, targeted)
        out[start:stop] = best[: stop - start]
        if progress is not None:
            progress(stop, len(images))
    return out


def check_gradients(model_fn, images, labels, what):
    """Raises ValueError when the input gradient of `model_fn` is all zero or not finite.

    An attack on a model whose gradient is disconnected (a `tf.stop_gradient`
    inside, `unconnected_gradients=ZERO`) or NaN would silently become random
    noise and report robustness that was never tested.

    Args:
      model_fn: the model the gradient attacks differentiate.
      images: float32 [N, ...] in [0, 1] (one batch suffices).
      labels: int [N].
      what: names the model in the error (e.g. the threat model).

    Returns:
      The gradient, float32 numpy array shaped like `images`.
    """
    x = tf.constant(np.asarray(images, np.float32))
    grad = np.asarray(_gradient_fn(model_fn)(x, tf.constant(np.asarray(labels, np.int32))))
    if not np.all(np.isfinite(grad)):
        raise ValueError(f"{what}: the input gradient is NaN or infinite; no attack can use it")
    if not np.any(grad):
        raise ValueError(
            f"{what}: the input gradient is zero for the whole batch of {len(grad)} examples "
            "(disconnected, e.g. a tf.stop_gradient in the model); a gradient attack on it "
            "would only add noise"
        )
    return grad


def predict(model_fn, images, batch_size=DEFAULT_BATCH_SIZE):
    """The classes `model_fn` predicts for `images` (int [N]; compiled, cached)."""
    images = np.asarray(images, np.float32)
    if len(images) == 0:
        return np.zeros([0], np.int64)
    logits = _logits_fn(model_fn)
    predictions = []
    for start, stop, (x,) in _even_batches((images,), min(batch_size, len(images))):
        predictions.append(logits(tf.constant(x)).numpy().argmax(-1)[: stop - start])
    return np.concatenate(predictions)


def accuracy(model_fn, images, labels, batch_size=DEFAULT_BATCH_SIZE):
    """Fraction of `images` that `model_fn` classifies as `labels` (compiled, cached)."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    if len(images) == 0:
        return float("nan")
    return float(np.mean(predict(model_fn, images, batch_size) == labels))


@tf.custom_gradient
def _straight_through(x, purified):
    """Returns `purified` forward and passes the gradient straight to `x` backward."""

    def grad(upstream):
        return upstream, tf.zeros_like(purified)

    return tf.identity(purified), grad


def bpda_model_fn(purifier, classifier):
    """A model_fn for BPDA (Athalye et al. 2018) with an identity backward for `purifier`.

    The forward pass is exactly `classifier(purifier(x))`; the backward pass
    treats the purifier as the identity, so the gradient with respect to `x`
    is the classifier's gradient evaluated at `purifier(x)`. Use it for
    purifiers whose gradients are useless (shattered or obfuscated).

    Args:
      purifier: callable mapping images to images of the same shape, e.g.
        `s2s_model.build_purifier(...)`.
      classifier: callable mapping images in [0, 1] to logits.

    Returns:
      A callable `x -> logits`. Build it once and reuse it: attack caches are
      keyed on this object.
    """

    def model_fn(x):
        x = tf.convert_to_tensor(x)
        purified = tf.stop_gradient(tf.cast(purifier(x), x.dtype))
        return classifier(_straight_through(x, purified))

    return model_fn
