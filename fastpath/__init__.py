"""fastpath: exact target-token log-probabilities from vLLM, without Python objects per position.

Layers, lowest first; a module imports only from its own layer or lower ones
(tests/unit/test_import_graph.py): the foundations (`extras`, `source_text`, `data`, `zoo`),
`worker` (inside vLLM's engine processes; carried upstream), `patches` (the ledger of what is
replaced in vLLM), `plugin` (vLLM's entry point), `engine` (the one module that talks to vLLM,
and the Scorer seam), `metrics` (windows, perplexity, kld), `server` (`fastpath serve` and its
client), `upstream` (the series), `tools` and `lm_eval_model` (check-vllm, reports,
lm-evaluation-harness), `cli`. `testing` is the test harness, which product code never imports.
"""

__version__ = "0.1.0"
