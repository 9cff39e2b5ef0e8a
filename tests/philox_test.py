"""Tests for s2s_tf.robustness.attacks.philox: TensorFlow's Philox draws, batched over seeds."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.robustness.attacks import philox

# Seeds with negative halves, halves above 2**32 and extreme values.
SEEDS = np.array(
    [[0, 0], [11, 1], [-5, 2**40 + 3], [2**62, -1], [123456789012, 987654321], [-(2**63), 7]],
    np.int64,
)


def _words(values):
    return tuple(tf.constant(v, tf.int64) for v in values)


def _tf_uniform(shape, seed, salt):
    """TensorFlow's own draw for one seed: what `philox.uniform` must equal row by row."""
    folded = tf.random.experimental.stateless_fold_in(
        tf.constant(seed, tf.int64), tf.constant(salt, tf.int64), alg="philox"
    )
    return tf.random.stateless_uniform(shape, folded, alg="philox").numpy()


class PhiloxTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters(
        # Random123's known-answer vectors for philox4x32-10: (counter, key, expected).
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        (
            (0xFFFFFFFF,) * 4,
            (0xFFFFFFFF,) * 2,
            (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
        ),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    )
    def test_known_answers(self, counter, key, expected):
        out = philox.philox4x32(_words(counter), _words(key))
        self.assertEqual([int(w) for w in out], list(expected))

    def test_matches_tensorflow_kernel_for_many_keys_at_once(self):
        rng = np.random.default_rng(0)
        keys = rng.integers(0, 2**32, (5, 2), dtype=np.uint64)
        counters = rng.integers(0, 2**32, (5, 4), dtype=np.uint64)
        ours = philox.philox4x32(
            tuple(tf.constant(counters[:, j].astype(np.int64)) for j in range(4)),
            tuple(tf.constant(keys[:, j].astype(np.int64)) for j in range(2)),
        )
        ours = np.stack([w.numpy() for w in ours], -1)
        for i in range(5):
            # The kernel's 64-bit key and counter are the 32-bit words, low word first.
            key = keys[i, 0] | (keys[i, 1] << np.uint64(32))
            counter = [
                counters[i, 0] | (counters[i, 1] << np.uint64(32)),
                counters[i, 2] | (counters[i, 3] << np.uint64(32)),
            ]
            theirs = tf.raw_ops.StatelessRandomUniformFullIntV2(
                shape=[4],
                key=tf.constant([key], tf.uint64),
                counter=tf.constant(counter, tf.uint64),
                alg=1,  # Philox
                dtype=tf.uint32,
            )
            self.assertAllEqual(ours[i], theirs.numpy().astype(np.int64))

    @parameterized.parameters(
        ((7,), 0),
        ((100, 5), 3),
        ((1, 28, 3), 0),
        ((2, 2), 2**33 + 5),
        ((1,), -9),
    )
    def test_uniform_equals_tensorflow_row_by_row(self, shape, salt):
        ours = philox.uniform(shape, SEEDS, salt).numpy()
        self.assertEqual(ours.shape, (len(SEEDS), *shape))
        for i, seed in enumerate(SEEDS):
            self.assertAllEqual(ours[i], _tf_uniform(shape, seed, salt))

    def test_rows_do_not_depend_on_the_batch(self):
        together = philox.uniform((3, 5), SEEDS, 4).numpy()
        for i in range(len(SEEDS)):
            self.assertAllEqual(philox.uniform((3, 5), SEEDS[i : i + 1], 4)[0], together[i])
        self.assertAllEqual(philox.uniform((3, 5), SEEDS[::-1], 4)[::-1], together)

    def test_head_computed_once_serves_every_salt(self):
        head = philox.folded_seed_head(SEEDS)
        for salt in (0, 1, 77):
            self.assertAllEqual(
                philox.uniform_from_head((6,), head, tf.constant(salt)),
                philox.uniform((6,), SEEDS, salt),
            )

    def test_compiled_with_unknown_batch_and_tensor_salt(self):
        @tf.function(
            input_signature=[tf.TensorSpec([None, 2], tf.int64), tf.TensorSpec([], tf.int64)]
        )
        def draw(seeds, salt):
            return philox.uniform((4, 3), seeds, salt)

        self.assertAllEqual(draw(SEEDS, tf.constant(5, tf.int64)), philox.uniform((4, 3), SEEDS, 5))

    def test_same_numbers_under_xla(self):
        draw = tf.function(lambda seeds: philox.uniform((4, 3), seeds, 9), jit_compile=True)
        self.assertAllEqual(draw(tf.constant(SEEDS)), philox.uniform((4, 3), SEEDS, 9))

    def test_draws_look_uniform(self):
        # Equality with TensorFlow's draws is the real check; this one guards the float
        # conversion: the range, and the mean and spread of 12,000 draws.
        u = philox.uniform((2000,), SEEDS, 1).numpy()
        self.assertAllInRange(u, 0.0, 1.0 - 2.0**-23)
        self.assertAllClose([u.mean(), u.var()], [0.5, 1.0 / 12.0], atol=0.01)

    def test_rejects_seeds_of_the_wrong_shape(self):
        with self.assertRaisesRegex(ValueError, r"\[N, 2\]"):
            philox.uniform((3,), np.zeros([2], np.int64), 0)
        with self.assertRaisesRegex(ValueError, r"\[N, 2\]"):
            philox.uniform((3,), np.zeros([4, 3], np.int64), 0)


if __name__ == "__main__":
    tf.test.main()
