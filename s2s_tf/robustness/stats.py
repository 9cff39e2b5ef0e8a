"""Statistics for robustness numbers: confidence intervals and exact paired tests.

Robust accuracy is a binomial proportion over the evaluated examples, so every
headline number comes with a 95 % Wilson score interval. Two attacks run on the
same examples are compared with McNemar's exact test on the discordant pairs
(examples fooled by one attack only), which is what decides a sanity check:
a one-example difference is noise, not a finding.
"""

import math

import numpy as np

ALPHA = 0.05
_Z95 = 1.959963984540054


def wilson_interval(successes, n, z=_Z95):
    """The Wilson score interval of a binomial proportion.

    Args:
      successes: number of successes (e.g. examples still classified correctly).
      n: number of trials.
      z: the normal quantile (default: two-sided 95 %).

    Returns:
      (low, high) in [0, 1]; (0, 1) when n is 0.
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes <= 0 else max(0.0, centre - half)
    high = 1.0 if successes >= n else min(1.0, centre + half)
    return low, high


def mcnemar_exact(only_a, only_b):
    """Two-sided exact McNemar test on the discordant pairs.

    Under the null hypothesis (the two attacks are equally strong), each
    example fooled by exactly one of them is fooled by A with probability 1/2.

    Args:
      only_a: examples fooled by attack A only.
      only_b: examples fooled by attack B only.

    Returns:
      The two-sided p-value (1.0 when there are no discordant pairs).
    """
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def min_discordant_for_significance(alpha=ALPHA):
    """The fewest discordant pairs with which an exact McNemar test can reach p < alpha."""
    n = 1
    while mcnemar_exact(0, n) >= alpha:
        n += 1
    return n


def compare(correct_a, correct_b, alpha=ALPHA):
    """Is attack B significantly stronger than attack A on the same examples?

    Args:
      correct_a: bool per example, still correct after attack A.
      correct_b: bool per example, still correct after attack B (same examples).
      alpha: the significance level.

    Returns:
      A dict: "only_a" / "only_b" (examples fooled by A only / B only),
      "p_value", "b_stronger" (B fools significantly more examples),
      "a_stronger", and "decidable" (whether the discordant pairs are enough
      for any significant result at `alpha`).
    """
    correct_a = np.asarray(correct_a, bool)
    correct_b = np.asarray(correct_b, bool)
    if correct_a.shape != correct_b.shape:
        raise ValueError(f"paired results differ in shape: {correct_a.shape} {correct_b.shape}")
    only_a = int(np.sum(~correct_a & correct_b))
    only_b = int(np.sum(correct_a & ~correct_b))
    p_value = mcnemar_exact(only_a, only_b)
    significant = p_value < alpha
    return {
        "only_a": only_a,
        "only_b": only_b,
        "p_value": p_value,
        "b_stronger": significant and only_b > only_a,
        "a_stronger": significant and only_a > only_b,
        "decidable": only_a + only_b >= min_discordant_for_significance(alpha),
    }


# Resample rows per vectorised bootstrap chunk, times the sample size: bounds memory.
_BOOTSTRAP_CELLS = 1 << 22


def mean_statistic(values):
    """The mean over the last axis (a `bootstrap` statistic)."""
    return np.mean(values, axis=-1)


def median_statistic(values):
    """The median over the last axis (a `bootstrap` statistic)."""
    return np.median(values, axis=-1)


def ratio_of_means(numerator, denominator):
    """sum(numerator) / sum(denominator) over the last axis (a paired `bootstrap` statistic)."""
    return np.sum(numerator, axis=-1) / np.sum(denominator, axis=-1)


def bootstrap(statistic, *samples, num_resamples=1000, seed=0, confidence=0.95):
    """The percentile-bootstrap interval of a statistic of per-example samples.

    Examples are resampled with replacement, jointly across `samples`, so paired
    samples (two models on the same images) stay paired.

    Args:
      statistic: callable(*arrays) reducing the last axis, e.g. `mean_statistic`.
      *samples: one or more [N] arrays, entry i belonging to example i.
      num_resamples: bootstrap resamples.
      seed: seeds the resampling, so the interval is reproducible.
      confidence: the interval's coverage.

    Returns:
      {"estimate": statistic on the samples, "interval": [low, high]} (floats).

    Raises:
      ValueError: for no samples, empty or unequal-length samples.
    """
    samples = [np.asarray(s, np.float64).reshape(-1) for s in samples]
    if not samples or len(samples[0]) == 0:
        raise ValueError("bootstrap needs at least one non-empty sample")
    n = len(samples[0])
    if any(len(s) != n for s in samples):
        raise ValueError(f"paired samples differ in length: {[len(s) for s in samples]}")
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CELLS // n)
    values = []
    for start in range(0, num_resamples, chunk):
        index = rng.integers(0, n, size=(min(chunk, num_resamples - start), n))
        values.append(statistic(*(s[index] for s in samples)))
    low, high = np.quantile(np.concatenate(values), [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"estimate": float(statistic(*samples)), "interval": [float(low), float(high)]}
