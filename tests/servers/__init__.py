"""Real `fastpath serve` processes on 127.0.0.1 and the HTTP client."""
