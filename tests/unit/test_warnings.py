"""The suite's warning filters: a deprecation raised at a call in fastpath's code is an error,
others' deprecations stay quiet (pyproject.toml's `filterwarnings`)."""

from __future__ import annotations

import warnings

import pytest


def _warn_from(module: str, category: type[Warning]) -> None:
    """A warning attributed to `module`, as `stacklevel` attributes vLLM's deprecations to
    the module that called the deprecated name."""
    warnings.warn_explicit("name is deprecated", category, filename=f"{module}.py", lineno=1,
                           module=module)


@pytest.mark.parametrize("category", [DeprecationWarning, PendingDeprecationWarning,
                                      FutureWarning])
@pytest.mark.parametrize("module", ["fastpath.patches._base", "fastpath.engine.scoring"])
def test_a_deprecation_at_fastpaths_call_fails_the_test(module, category):
    with pytest.raises(category, match="deprecated"):
        _warn_from(module, category)


def test_other_packages_deprecations_stay_quiet():
    """An error filter for every deprecation would raise here and fail the test."""
    _warn_from("transformers.utils", DeprecationWarning)
    _warn_from("tests.unit.test_warnings", DeprecationWarning)
