"""absl flag definitions (`define_*_flags()`), validators and `--flagfile` presets.

Installed as `s2s_tf.flags`. Only binaries import this package; library code
takes explicit arguments or config dataclasses.
"""
