"""TensorFlow's stateless Philox draws with one seed per row, computed for all rows at once.

`tf.random.stateless_uniform` takes one seed, so drawing with a different seed per
example (what makes an example's attack independent of its batch) needs a loop over the
examples (`tf.map_fn`; `tf.vectorized_map` falls back to the same loop): inside an
attack's query loop, a few kernels per example per draw. Here the same generator,
Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011),
is written with elementwise integer ops, so the keys and counters of every row are one
tensor and a draw for the whole batch is a few dozen vectorised ops.

The draws are bit-identical to TensorFlow's own (`alg="philox"`, outside XLA):
`uniform(shape, seeds, salt)[i]` equals
`tf.random.stateless_uniform(shape, stateless_fold_in(seeds[i], salt), alg="philox")`,
so code that switches to it keeps its results. Under XLA, TensorFlow's kernels draw other
numbers from the same seed; these ops draw the same numbers on every device and compiler.

32-bit words are held in int64 tensors (values in [0, 2**32)), as int64 multiply, add,
shift, and, xor have kernels on every device and under XLA (unlike uint32 multiplies
on some); the products are split so that none overflows.
"""

import tensorflow as tf

_MASK32 = 0xFFFFFFFF
# Philox-4x32 round multipliers and Weyl key increments (Random123).
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10
# The fixed key TensorFlow scrambles a user seed with (`GenerateKey`, stateless_random_ops.cc).
_SCRAMBLE_KEY = (0x3EC8F720, 0x02461E29)


def _mulhilo(a, m):
    """(high, low) 32-bit words of a * m, for words a (int64 tensor) and constant m < 2**32."""
    # a * m can reach 2**64; split m into 16-bit halves so each product stays below 2**48.
    p_lo = a * (m & 0xFFFF)
    p_hi = a * (m >> 16)
    hi = _shr(p_hi + _shr(p_lo, 16), 16)
    lo = (p_lo + _shl(p_hi & 0xFFFF, 16)) & _MASK32
    return hi, lo


def _shr(v, n):
    return tf.bitwise.right_shift(v, tf.constant(n, tf.int64))


def _shl(v, n):
    return tf.bitwise.left_shift(v, tf.constant(n, tf.int64))


def philox4x32(counter, key):
    """Philox-4x32-10 of each counter under its key.

    Args:
        counter: four int64 tensors (words c0..c3, each in [0, 2**32)), broadcastable.
        key: two int64 tensors (k0, k1), broadcastable against the counter words.

    Returns:
        Four int64 tensors, the output words, in [0, 2**32).
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for i in range(_ROUNDS):
        if i:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def split_words(v):
    """The (low, high) 32-bit words of int64 values, each as int64 in [0, 2**32)."""
    v = tf.cast(v, tf.int64)
    # The arithmetic shift copies the sign bit of negative seeds; the mask drops it.
    return v & _MASK32, _shr(v, 32) & _MASK32


def scramble(seed_words):
    """TensorFlow's seed -> (key, counter) scramble, for seeds given as four words.

    Args:
        seed_words: (seed0 low, seed0 high, seed1 low, seed1 high), int64 tensors.

    Returns:
        (key, counter): two and four int64 word tensors; counter words 0 and 1 are 0.
    """
    mix = philox4x32(seed_words, _SCRAMBLE_KEY)
    zero = tf.zeros_like(mix[0])
    return (mix[0], mix[1]), (zero, zero, mix[2], mix[3])


def seed_words(seeds):
    """Per-row seeds int64 [N, 2] as four word tensors [N] (seed0 lo, hi, seed1 lo, hi)."""
    seeds = tf.convert_to_tensor(seeds)
    if seeds.shape.rank != 2 or seeds.shape[1] not in (None, 2):
        raise ValueError(f"seeds must have shape [N, 2], got {seeds.shape}")
    seeds = tf.cast(seeds, tf.int64)
    return (*split_words(seeds[:, 0]), *split_words(seeds[:, 1]))


def folded_seed_head(seeds):
    """The first seed of `stateless_fold_in(seeds[i], data)`, which ignores `data`, as words.

    `fold_in(seed, data)` is `(a full-range int64 drawn from seed, data)`, so its first half
    depends on the seed only; callers that fold in many values compute it once.

    Args:
        seeds: int64 [N, 2] per-row seeds.

    Returns:
        Two int64 tensors [N]: the low and high words of the drawn int64.
    """
    key, counter = scramble(seed_words(seeds))
    w = philox4x32(counter, key)
    # A full-range int64 takes words 0 and 1 of the first block, word 0 as the low half.
    return w[0], w[1]


def uniform_from_head(shape, head, salt):
    """Uniform float32 [N, *shape] in [0, 1) from `folded_seed_head` words and a salt.

    Args:
        shape: a static shape (tuple of ints) of one row's draw.
        head: the two word tensors [N] from `folded_seed_head`.
        salt: int or int scalar tensor folded in (TensorFlow's `data`).

    Returns:
        float32 [N, *shape]: row i is `stateless_uniform(shape, fold_in(seed_i, salt))`.
    """
    shape = tuple(int(d) for d in shape)
    size = 1
    for d in shape:
        size *= d
    rows = tf.shape(head[0])
    salt_lo, salt_hi = (tf.broadcast_to(w, rows) for w in split_words(salt))
    key, counter = scramble((head[0], head[1], salt_lo, salt_hi))
    blocks = -(-size // 4)
    # Block b of a draw is Philox of the row's counter plus b (counter word 0 starts at 0
    # and stays below 2**32 here, so the increment never carries).
    b = tf.range(blocks, dtype=tf.int64)[None, :]
    col = lambda v: v[:, None]  # noqa: E731 (rows against blocks)
    out = philox4x32(
        (b + col(counter[0]), col(counter[1]), col(counter[2]), col(counter[3])),
        (col(key[0]), col(key[1])),
    )
    words = tf.reshape(tf.stack(out, axis=-1), [-1, 4 * blocks])[:, :size]
    # TensorFlow's uint32 -> float: the low 23 bits as the mantissa of a float in [1, 2), minus 1.
    u = tf.cast(words & 0x7FFFFF, tf.float32) * (2.0**-23)
    u = tf.reshape(u, [-1, *shape])
    u.set_shape(head[0].shape.concatenate(shape))  # keeps a static batch size static
    return u


def uniform(shape, seeds, salt):
    """Uniform float32 [N, *shape] in [0, 1), row i drawn from seed `seeds[i]` folded with `salt`.

    Equal, bit for bit, to stacking
    `tf.random.stateless_uniform(shape, tf.random.experimental.stateless_fold_in(seeds[i],
    tf.cast(salt, tf.int64), alg="philox"), alg="philox")` over the rows.

    Args:
        shape: static shape (tuple of ints) of one row's draw.
        seeds: int64 [N, 2], one seed per row.
        salt: int or int scalar tensor.

    Returns:
        float32 [N, *shape].
    """
    return uniform_from_head(shape, folded_seed_head(seeds), salt)
