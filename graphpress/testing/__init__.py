"""Test helpers shared by graphpress test suites and benchmarks.

``assert_equivalent`` compares two callables. The model zoo lives in
:mod:`graphpress.testing.zoo` (imported on its own: it needs the ``test`` extra, transformers).
"""

from graphpress.testing.equivalence import assert_equivalent

__all__ = ["assert_equivalent"]
