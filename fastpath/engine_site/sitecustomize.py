"""Loaded at start-up by every Python process with this directory on PYTHONPATH.

Settings that must reach the engine-core and worker processes vLLM spawns, before they
import vLLM; the environment carries them, and this module acts on it:
- FASTPATH_V2_CPU=1: register fastpath's stand-in "cpu" Triton backend, so vLLM's engine
  processes can run the V2 model runner on CPU through Triton's interpreter
  (fastpath/engine/runners.py; `fastpath ppl --model-runner v2` and the tests);
- FASTPATH_CPU_ISA=avx2|avx512, a test condition: make torch report only that instruction
  set, so vLLM loads that kernel build (fastpath/testing/kernels.py).
Without either it does nothing but hand over to any other sitecustomize module further
down the path.
"""

import importlib.util
import os
import sys

if os.environ.get("FASTPATH_V2_CPU") == "1":
    from fastpath.engine.runners import install_stand_in

    install_stand_in()

if os.environ.get("FASTPATH_CPU_ISA", "native") not in ("", "native"):
    from fastpath.testing.kernels import apply_in_process

    apply_in_process()


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
