"""The test harness: conditions the tests reproduce in vLLM's engine processes (a forced CPU
kernel build and busy cores, `kernels`), engines on a chosen model runner proven to be that
runner (`v2cpu`), and the counters tests and benchmarks share (`measure`). Product code does
not import it (tests/unit/test_import_graph.py)."""
