"""Offline stand-in for @rules_python//python:defs.bzl.

Forwards to the Python rules built into Bazel, which accept the same
attributes the root BUILD file uses (srcs, deps, data, main, size, timeout).
"""

def py_library(**attrs):
    native.py_library(**attrs)

def py_binary(**attrs):
    native.py_binary(**attrs)

def py_test(**attrs):
    native.py_test(**attrs)
