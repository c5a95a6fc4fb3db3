"""Build hook: compiles the C parts (shared ring, guarded eventfd I/O) through cffi at install."""

from setuptools import setup

setup(
    cffi_modules=[
        "shared/ring/_build.py:ffibuilder",
        "shared/evtchn/_build.py:ffibuilder",
    ]
)
