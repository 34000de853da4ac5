"""What vLLM imports in every process it starts stays light: `import fastpath.plugin` and
`register()` import none of fastpath's optional dependencies.

Run in a fresh interpreter under `python -X importtime`, whose tree of imports says who
imported what, so nothing this test process already imported can hide one. The patches
import vLLM's own modules, and vLLM may import a heavy package itself (in an environment
with scikit-learn, `vllm.config.model` -> transformers -> sklearn -> pandas): vLLM does
that in its processes with or without fastpath, so only a chain that fastpath starts
outside vLLM counts.
"""

from __future__ import annotations

import os
import subprocess
import sys

# Top-level packages of the extras (report, data, client, lm-eval): never in the plugin.
HEAVY = ("pandas", "matplotlib", "datasets", "lm_eval", "httpx")
PLUGIN_CODE = "import fastpath.plugin; fastpath.plugin.register()"


def import_chains(code: str) -> dict[str, list[str]]:
    """For each module a fresh interpreter imports running `code`: the chain of imports
    that led to it, outermost first (from `-X importtime`'s indented tree)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("FASTPATH_DISABLE", None)  # register() must really patch
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.rpartition("|")[2] for line in done.stderr.splitlines()
            if line.startswith("import time:") and "|" in line][1:]  # [0] is the header
    chains: dict[str, list[str]] = {}
    pending: list[tuple[int, str]] = []  # (depth, module) imported by a later, shallower row
    for row in rows:  # a module's row comes after the rows of what it imported
        depth, module = len(row) - len(row.lstrip()), row.strip()
        children = [m for d, m in pending if d > depth]
        pending = [(d, m) for d, m in pending if d <= depth] + [(depth, module)]
        for child in children:
            _prefix(chains, child, module)
        chains.setdefault(module, [module])
    return chains


def _prefix(chains: dict[str, list[str]], module: str, importer: str) -> None:
    """Record that `importer` imported `module` (and so everything `module` imported)."""
    for chain in chains.values():
        if chain[0] == module:
            chain.insert(0, importer)


def started_by_fastpath(chain: list[str]) -> bool:
    """Whether the import below the last fastpath module of `chain` is not vLLM's own."""
    owners = [m.split(".")[0] for m in chain]
    if "fastpath" not in owners:
        return False
    last = len(owners) - 1 - owners[::-1].index("fastpath")
    return owners[last + 1] != "vllm"


def test_plugin_imports_no_optional_dependency():
    chains = import_chains(PLUGIN_CODE)
    assert any(m.startswith("vllm.") for m in chains), "register() did not reach vLLM"
    ours: dict[str, list[str]] = {}  # package -> its shortest chain started by fastpath
    for module, chain in chains.items():
        package = module.split(".")[0]
        if package in HEAVY and started_by_fastpath(chain):
            ours[package] = min(ours.get(package, chain), chain, key=len)
    assert not ours, (f"`{PLUGIN_CODE}` imports {', '.join(sorted(ours))} (fastpath's "
                      "extras):\n" + "\n".join(" -> ".join(c) for c in ours.values()))
