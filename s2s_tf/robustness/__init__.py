"""The robust-accuracy engine: attacks, threat models, runner, evaluation, stats, checks."""
