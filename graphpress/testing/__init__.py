"""Test helpers shared by graphpress test suites and benchmarks."""
