"""The test harness: conditions the tests reproduce in vLLM's engine processes (a forced CPU
kernel build and busy cores, `kernels`), engines on a chosen model runner proven to be that
runner (`v2cpu`), the counters tests and benchmarks share (`measure`), and the references
they compare with: transformers (`reference`), the peers' own loops (`peers`) and RTN copies
of zoo models (`quantize`). Product code does not import it (tests/unit/test_import_graph.py)."""
