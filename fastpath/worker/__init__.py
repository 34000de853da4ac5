"""Code that runs inside vLLM's engine processes, and that the upstream series carries into
vLLM as its own modules: the `target_token_ids` form and its checks (`targets`), the scorer
that gathers the targets' logprobs from the hidden states (`fixed_ids`), the glue that binds
it to a model runner (`fixed_id_runner`) and the row-subset probe (`rowsubset`). Imports
nothing of fastpath's above it (tests/unit/test_import_graph.py)."""
