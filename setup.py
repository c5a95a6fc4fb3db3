"""Build hook: compiles the shared-ring C layout through cffi (API mode) at install time."""

from setuptools import setup

setup(cffi_modules=["shared/ring/_build.py:ffibuilder"])
