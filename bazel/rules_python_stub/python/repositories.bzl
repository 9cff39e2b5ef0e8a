"""Offline stand-in for @rules_python//python:repositories.bzl.

The real `py_repositories()` declares the repositories rules_python needs;
the stub needs none, so the root WORKSPACE can call it unchanged.
"""

def py_repositories():
    pass
