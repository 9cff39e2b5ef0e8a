"""s2s_tf: Structure-to-Signal autoencoders (S2SNet) as an adversarial defense.

A TensorFlow/Keras implementation of Folz, Palacio, Hees, Borth and Dengel,
"Adversarial Defense based on Structure-to-Signal Autoencoders" (WACV 2020,
arXiv:1803.07994).
"""

__version__ = "0.1.0"

try:
    import tensorflow  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "s2s_tf needs TensorFlow. Install it with the extra that fits your machine: "
        "`pip install s2s_tf[cpu]` (tensorflow-cpu) or `pip install s2s_tf[gpu]` "
        "(tensorflow[and-cuda])."
    ) from e
