"""Test conditions that must reach vLLM's engine processes: vLLM's V2 runner on CPU
(`v2cpu`), a forced CPU kernel build and busy cores (`kernels`). Used by the tests and by
`fastpath ppl --model-runner`, and by the runner environment `fastpath kld` and lm-eval
pin; the plugin does not use it."""

from pathlib import Path

# Put on PYTHONPATH for engine processes: its sitecustomize.py applies the conditions above.
SITE_DIR = Path(__file__).with_name("engine_site")
