"""Robustness evaluation: attacks, threat models, gradient analysis and the report."""
