"""Pure units: no engine, no server (fastpath's modules on their own, and the V1 runner
patch driven without an engine)."""
