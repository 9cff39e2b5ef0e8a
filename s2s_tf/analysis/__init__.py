"""The paper's analyses, read from the robust-accuracy engine's results, and the report."""
