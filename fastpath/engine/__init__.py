"""fastpath's side of an in-process vLLM engine: `scoring` is the one module that calls vLLM's
request API (requests in, float32 arrays out), `scorer` the `Scorer` seam that engines and
servers share, `runners` which model runner (V1, V2) a process uses."""
