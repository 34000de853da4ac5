"""The `fastpath` command line: flags, errors, reports."""
