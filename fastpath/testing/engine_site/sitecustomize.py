"""Loaded at start-up by every Python process with this directory on PYTHONPATH.

With FASTPATH_V2_CPU=1 it registers fastpath's stand-in "cpu" Triton backend before vLLM
is imported, so vLLM's engine processes can run the V2 model runner on CPU through
Triton's interpreter (see fastpath/testing/v2cpu.py). Without it, it does nothing but hand
over to any other sitecustomize module further down the path.
"""

import importlib.util
import os
import sys

if os.environ.get("FASTPATH_V2_CPU") == "1":
    from fastpath.testing.v2cpu import install_stand_in

    install_stand_in()


def _chain() -> None:
    """Run the next sitecustomize on sys.path, which this module shadows."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        if os.path.abspath(entry or os.curdir) == here:
            continue
        candidate = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_fastpath_next_sitecustomize",
                                                          candidate)
            if spec and spec.loader:
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


_chain()
