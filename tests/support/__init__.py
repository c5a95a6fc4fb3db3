"""Helpers the test suite shares: import them as ``tests.support.<module>``.

``tests/conftest.py`` turns the ones that need a temporary directory or a
clean-up into fixtures; the modules themselves are plain code (a fake host
tree, which users need too, is ``pciback.testing.FakeHost``):

* ``configs``: backend configurations as TOML text (guests, edu devices, one
  ``[[device]]`` table, a ``listen`` line);
* ``inprocess``: an in-process backend with its control socket, and ``pciback ctl``;
* ``rawguest``: a hand-driven guest speaking the protocol, for interrupt, DMA and
  limit tests that must see every event the backend sends;
* ``serve``: a real ``pciback serve`` process, started until it serves and
  stopped cleanly;
* ``tls``: a test CA, the backend's certificate files and a guest's TLS context.

(A package rather than helpers in ``tests/conftest.py`` itself: test modules
import from here, and ``import conftest`` in ``tests/security`` must keep meaning
that directory's conftest.)
"""
