"""Support for checking vLLM's V2 runner on CPU (the tests, `fastpath ppl --model-runner`) and
the runner environment variable `fastpath kld` and lm-eval pin; the plugin does not use it."""
