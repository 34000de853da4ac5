"""Maintenance and reporting: judging a vLLM release against the patch ledger (`check_vllm`)
and benchmark / kld JSON turned into CSV tables and plots (`report`)."""
