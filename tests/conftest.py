"""pytest configuration for the tf.test-based test files."""


def pytest_collection_modifyitems(config, items):
    """Drops `tf.test.TestCase.test_session`, a context manager that pytest mistakes for a test."""
    del config
    items[:] = [item for item in items if item.name != "test_session"]
