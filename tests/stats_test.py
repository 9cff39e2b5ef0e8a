"""Tests for s2s_tf/robustness/stats.py: Wilson intervals and exact McNemar tests."""

import math

import numpy as np
import tensorflow as tf

from s2s_tf.robustness import stats


class StatsTest(tf.test.TestCase):
    def test_wilson_interval_known_values(self):
        # 8 of 10: the textbook Wilson 95% interval is (0.490, 0.943).
        low, high = stats.wilson_interval(8, 10)
        self.assertAllClose([low, high], [0.4902, 0.9433], atol=1e-3)
        self.assertEqual(stats.wilson_interval(0, 0), (0.0, 1.0))
        low, high = stats.wilson_interval(0, 50)
        self.assertEqual(low, 0.0)
        self.assertLess(high, 0.08)

    def test_wilson_interval_covers_the_truth(self):
        rng = np.random.default_rng(0)
        p, n, trials = 0.3, 100, 400
        covered = 0
        for k in rng.binomial(n, p, size=trials):
            low, high = stats.wilson_interval(int(k), n)
            covered += low <= p <= high
        self.assertGreater(covered / trials, 0.92)

    def test_mcnemar_exact_values(self):
        self.assertEqual(stats.mcnemar_exact(0, 0), 1.0)
        self.assertAlmostEqual(stats.mcnemar_exact(0, 5), 2 / 32)
        self.assertAlmostEqual(stats.mcnemar_exact(1, 9), 2 * 11 / 1024)
        self.assertAlmostEqual(stats.mcnemar_exact(9, 1), stats.mcnemar_exact(1, 9))
        self.assertEqual(stats.mcnemar_exact(5, 5), 1.0)
        self.assertEqual(stats.min_discordant_for_significance(), 6)
        self.assertLess(stats.mcnemar_exact(0, 6), 0.05)
        self.assertTrue(math.isclose(stats.mcnemar_exact(0, 6), 2 / 64))

    def test_compare_counts_and_decides(self):
        a = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 1], bool)
        b = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1], bool)
        result = stats.compare(a, b)
        self.assertEqual((result["only_a"], result["only_b"]), (0, 7))
        self.assertAlmostEqual(result["p_value"], 2 / 128)
        self.assertTrue(result["b_stronger"])
        self.assertFalse(result["a_stronger"])
        one_off = stats.compare(a, np.logical_and(a, np.arange(10) != 0))
        self.assertFalse(one_off["b_stronger"])
        self.assertFalse(one_off["decidable"])
        with self.assertRaisesRegex(ValueError, "shape"):
            stats.compare(a, b[:5])


if __name__ == "__main__":
    tf.test.main()
