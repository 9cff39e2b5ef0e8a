"""pytest configuration for the tf.test-based test files.

Also: in CI (environment variable CI=true) a test skipped because Fashion-MNIST is
missing FAILS. CI's set-up script installs the dataset, so such a skip there means
a broken set-up, and the tests that need real data would silently never run. Skips
for other reasons (PyTorch is not installed in CI) stay skips.
"""

import os
import re

import pytest

# What a Fashion-MNIST skip reason mentions: the dataset, its Debian package or its path.
FASHION_MNIST_SKIP = re.compile(r"fashion[-_ ]?mnist", re.IGNORECASE)
CI_TRUE = ("1", "true", "yes")


def in_ci(environ=None):
    """Whether the environment says this is a CI run (CI=true, as CI services set it)."""
    return (environ if environ is not None else os.environ).get("CI", "").lower() in CI_TRUE


def skip_reason(report):
    """The reason of a skipped test's report ("" for other reports)."""
    if not report.skipped:
        return ""
    if isinstance(report.longrepr, tuple):  # (path, line, "Skipped: reason")
        return str(report.longrepr[2])
    return str(report.longrepr or "")


def pytest_collection_modifyitems(config, items):
    """Drops `tf.test.TestCase.test_session`, a context manager that pytest mistakes for a test."""
    del config
    items[:] = [item for item in items if item.name != "test_session"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Turns a Fashion-MNIST skip into a failure when CI=true."""
    del item, call
    report = yield
    reason = skip_reason(report)
    if in_ci() and FASHION_MNIST_SKIP.search(reason) and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (
            f"Fashion-MNIST skip with CI=true ({reason})\nThe set-up script installs "
            "Fashion-MNIST in CI, so this skip would hide a broken set-up; it fails "
            "instead (tests/conftest.py)."
        )
    return report
