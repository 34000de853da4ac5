"""What is computed from the scores: windows over a text (`windows`), the tools' conventions
(`conventions`), perplexity (`perplexity`), KL divergence against a base model (`kld`, with
the statistics in `divergence` and the reusable base pass in `basefile`). They ask a
`fastpath.engine.scorer.Scorer`, never vLLM."""
