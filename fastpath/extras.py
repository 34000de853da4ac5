"""Optional dependencies: what each extra of `pip install 'fastpath[EXTRA]'` brings, and the
import that says which extra to install when one is missing.

The core (the plugin vLLM loads in every process, `fastpath ppl` on a local engine) needs
none of them: reports (`report`: pandas, matplotlib), Hugging Face datasets (`data`), the
HTTP client for `fastpath ppl --server` (`client`: httpx) and lm-evaluation-harness
(`lm-eval`) are imported only by the code that uses them, through `require`.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module`, or raise MissingExtra saying `purpose` needs `fastpath[extra]`."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise MissingExtra(f"{purpose} needs {module.split('.')[0]}, which is not installed: "
                           f"pip install 'fastpath[{extra}]'", name=error.name) from error
