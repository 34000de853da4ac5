"""`fastpath serve` (vLLM's OpenAI server with the scoring route and its request checks,
`serve`) and the client that scores on one or more such servers (`client`)."""
