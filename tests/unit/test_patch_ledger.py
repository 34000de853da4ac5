"""The patch ledger matches the patch modules, and a patch refuses code it does not know."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import fastpath.patches as patches
from fastpath import plugin
from fastpath.patches import PatchRefused, Replacement

needs_patch = pytest.mark.skipif(
    patches.native_support(),
    reason="this vLLM has target_token_ids natively: fastpath applies no patch",
)


def _patch_modules() -> set[str]:
    return {m.name for m in pkgutil.iter_modules(patches.__path__) if not m.name.startswith("_")}


def test_ledger_lists_every_patch_module_and_nothing_else():
    assert {entry.module for entry in patches.LEDGER} == _patch_modules()


@pytest.mark.parametrize("entry", patches.LEDGER, ids=lambda e: e.module)
def test_ledger_entry_is_complete_and_module_has_header(entry):
    for field in ("component", "why", "how", "upstream_pr", "removal_plan"):
        assert len(getattr(entry, field).strip()) > 10, f"{entry.module}.{field} is empty"
    module = importlib.import_module(f"fastpath.patches.{entry.module}")
    header = module.__doc__ or ""
    for heading in ("Replaces:", "Why:", "Checked against:", "Removal:"):
        assert heading in header, f"{entry.module} header lacks {heading!r}"
    for replacement in module.REPLACEMENTS:
        assert replacement.name in header, f"header of {entry.module} omits {replacement.name}"
        assert replacement.known_fingerprints, replacement.qualname


@needs_patch
def test_installed_vllm_is_recognised():
    import vllm

    assert vllm.__version__ in patches.SUPPORTED_VLLM
    for replacement in patches.replacements():
        replacement.check(vllm.__version__)  # raises PatchRefused if the source changed


@needs_patch
def test_apply_is_idempotent():
    first = patches.apply()
    second = patches.apply()
    assert first == second and len(first) == len(patches.replacements())
    for replacement in patches.replacements():
        assert replacement.is_bound()
        assert not getattr(replacement.new.__wrapped__, "__fastpath_patch__", False), (
            f"{replacement.qualname} wraps itself: applied twice"
        )


def test_unknown_upstream_code_is_refused_by_name_and_version():
    class Upstream:
        def method(self):
            return "changed upstream"

    def replacement_fn(self):
        return "patched"

    replacement = Replacement(Upstream, "method", replacement_fn, frozenset({"0" * 16}))
    with pytest.raises(PatchRefused) as error:
        replacement.check("9.9.9")
    message = str(error.value)
    assert "Upstream.method" in message and "9.9.9" in message and "FASTPATH_DISABLE" in message
    assert Upstream().method() == "changed upstream"  # nothing was bound


@needs_patch
def test_refusal_is_all_or_nothing(monkeypatch):
    """In a process with upstream's code restored, one unknown function binds nothing."""
    todo = patches.replacements()
    for r in todo:  # put upstream's functions back (monkeypatch re-patches afterwards)
        current = r.owner.__dict__[r.name]
        monkeypatch.setattr(r.owner, r.name, getattr(current, "__wrapped__", current))
    originals = {r.qualname: r.owner.__dict__[r.name] for r in todo}
    assert not any(getattr(f, "__fastpath_patch__", False) for f in originals.values())
    middle = len(todo) // 2
    bad = Replacement(todo[middle].owner, todo[middle].name, todo[middle].new,
                      frozenset({"f" * 16}))
    monkeypatch.setattr(patches, "_applied", False)
    monkeypatch.setattr(patches, "replacements",
                        lambda: [*todo[:middle], bad, *todo[middle + 1:]])
    with pytest.raises(PatchRefused) as error:
        patches.apply()
    assert todo[middle].qualname in str(error.value)
    assert {r.qualname: r.owner.__dict__[r.name] for r in todo} == originals, "bound some"
    assert patches.applied() == []


def test_disabled_plugin_binds_nothing(monkeypatch):
    monkeypatch.setenv(plugin.DISABLE_ENV, "1")
    monkeypatch.setattr(patches, "apply", lambda: pytest.fail("apply() ran while disabled"))
    plugin.register()


def test_plugin_stands_aside_when_vllm_has_target_token_ids(monkeypatch):
    from vllm.inputs import TokensPrompt

    monkeypatch.setitem(TokensPrompt.__annotations__, "target_token_ids", list[int])
    assert patches.native_support()
    monkeypatch.setattr(patches, "apply", lambda: pytest.fail("patched a native vLLM"))
    plugin.register()


def test_entry_point_is_registered_with_vllm():
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "fastpath"]
    assert entry.load() is plugin.register
