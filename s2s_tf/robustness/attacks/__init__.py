"""Adversarial attacks on [0, 1] images, one module per attack, and their registry.

Importing this package imports every attack module, each of which registers
its `AttackSpec` in `registry.ATTACKS`. A new attack is one module here that
calls `registry.register(...)`, plus one import line below.
"""

from s2s_tf.robustness.attacks import apgd  # noqa: F401 (registers)
from s2s_tf.robustness.attacks import cw_l2  # noqa: F401 (registers)
from s2s_tf.robustness.attacks import fab  # noqa: F401 (registers)
from s2s_tf.robustness.attacks import fgsm  # noqa: F401 (registers)
from s2s_tf.robustness.attacks import mim  # noqa: F401 (registers)
from s2s_tf.robustness.attacks import noise  # noqa: F401 (registers)
from s2s_tf.robustness.attacks import pgd  # noqa: F401 (registers)
from s2s_tf.robustness.attacks import spsa  # noqa: F401 (registers)
from s2s_tf.robustness.attacks import square  # noqa: F401 (registers)
from s2s_tf.robustness.attacks.base import L2
from s2s_tf.robustness.attacks.base import LINF
from s2s_tf.robustness.attacks.registry import ATTACKS
from s2s_tf.robustness.attacks.registry import AttackSpec
from s2s_tf.robustness.attacks.registry import enforce_budget
from s2s_tf.robustness.attacks.registry import get_spec

__all__ = ["ATTACKS", "L2", "LINF", "AttackSpec", "enforce_budget", "get_spec"]
