"""`fastpath check-vllm`: a vLLM release judged against the ledger without installing it."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from fastpath import cli, patches
from fastpath.patches import Borrowed, PatchRefused
from fastpath.source_text import decode, fingerprint_text, function_source
from fastpath.tools import check_vllm

SITE = Path(importlib.util.find_spec("vllm").origin).parents[1]  # holds vllm/, not imported here
MANIFEST, ENTRIES = check_vllm.load_manifest()
ROOT = Path(__file__).resolve().parents[2]

needs_patch = pytest.mark.skipif(
    patches.native_support(),
    reason="this vLLM has target_token_ids natively: fastpath applies no patch",
)


def installed_text(module: str) -> str:
    return decode(Path(importlib.util.find_spec(module).origin).read_bytes())


def release_files() -> dict[str, bytes]:
    """The installed files check-vllm reads, relative to the tree's root."""
    wanted = {"vllm/__init__.py"} | {
        next(rel for rel in check_vllm.module_path(e.module) if (SITE / rel).exists())
        for e in ENTRIES}
    return {rel: (SITE / rel).read_bytes() for rel in sorted(wanted)}


def copy_tree(tmp_path: Path) -> Path:
    for rel, data in release_files().items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    return tmp_path


@needs_patch
def test_manifest_is_the_register(tmp_path, monkeypatch):
    """The stored entries and known sources are what `--write-known` makes from the ledger."""
    assert check_vllm.ledger_entries() == ENTRIES, f"run `{check_vllm.WRITE_COMMAND}`"
    monkeypatch.setattr(check_vllm, "KNOWN_DIR", tmp_path)
    monkeypatch.setattr(check_vllm, "MANIFEST", tmp_path / "manifest.json")
    check_vllm.write_known(ENTRIES)
    stored = {p.name: p.read_bytes() for p in check_vllm.KNOWN_DIR.glob("*.src")}
    regenerated = {p.name: p.read_bytes() for p in tmp_path.glob("*.src")}
    assert regenerated.items() <= stored.items(), f"run `{check_vllm.WRITE_COMMAND}`"
    for name, data in stored.items():
        assert name.endswith(f"-{fingerprint_text(data.decode())}.src"), name


@needs_patch
@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.fingerprints], ids=lambda e: e.qualname)
def test_static_fingerprint_is_the_runtime_fingerprint(entry):
    live = {r.qualname: r.original() for r in patches.replacements(scope=None)}
    runtime = live.get(entry.full_name)
    func = runtime or check_vllm._resolve(entry)
    static = function_source(installed_text(entry.module), entry.qualname)
    assert static == inspect.getsource(func)
    assert fingerprint_text(static) == patches.fingerprint(func)


@pytest.mark.parametrize("module", sorted({e.module for e in ENTRIES}))
def test_static_source_is_inspect_getsource_for_every_function(module):
    """Beyond the ledger: every function of the modules the patches touch, text for text."""
    loaded = importlib.import_module(module)
    text = installed_text(module)
    functions = [obj for obj in vars(loaded).values()
                 if inspect.isfunction(obj) and obj.__module__ == module]
    for cls in [c for c in vars(loaded).values() if inspect.isclass(c) and c.__module__ == module]:
        for value in vars(cls).values():
            value = getattr(value, "__func__", value)
            if inspect.isfunction(value) and value.__module__ == module:
                functions.append(value)
    compared = 0
    for func in functions:
        try:
            expected = inspect.getsource(func)
        except (OSError, TypeError):  # generated (dataclass __init__, ...): no source
            continue
        qualname = inspect.unwrap(func).__qualname__
        if "<locals>" in qualname:
            continue
        assert function_source(text, qualname) == expected, qualname
        compared += 1
    assert compared >= 1


@needs_patch
def test_borrowed_names_pass_at_run_time_and_a_changed_one_is_refused():
    import vllm

    for entry in patches.borrowed():
        entry.check(vllm.__version__)
    changed = Borrowed("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._sync_device",
                       "gpu_model_runner", frozenset({"0" * 16}))
    with pytest.raises(PatchRefused, match=r"GPUModelRunner\._sync_device.*gpu_model_runner.*"
                                           r"has changed"):
        changed.check("9.9.9")
    gone = Borrowed("vllm.v1.worker.gpu_input_batch", "InputBatch.no_such_attribute", "x")
    with pytest.raises(PatchRefused, match=r"InputBatch\.no_such_attribute.*is missing"):
        gone.check("9.9.9")


def test_installed_tree_is_known(capsys):
    assert cli.main(["check-vllm", str(SITE)]) == check_vllm.EXIT_OK
    out = capsys.readouterr().out
    for entry in ENTRIES:
        status = "known" if entry.fingerprints else "present"
        assert any(line.split()[:3] == [status, entry.kind, entry.full_name]
                   for line in out.splitlines()), entry.full_name
    assert "0 changed, 0 missing" in out


def test_changed_copy_is_refused_with_a_diff_naming_it(tmp_path, capsys):
    tree = copy_tree(tmp_path)
    runner = tree / "vllm/v1/worker/gpu_model_runner.py"
    text = runner.read_text()
    marker = "    def sample_tokens(\n"
    assert text.count(marker) == 1
    runner.write_text(text.replace(marker, "    @staticmethod\n" + marker, 1)
                      .replace("    def _sync_device(self)", "    def _sync_device_gone(self)"))
    batch = tree / "vllm/v1/worker/gpu_input_batch.py"
    batch.write_text(batch.read_text().replace("self.req_id_to_index", "self.req_index"))
    assert check_vllm.main([str(tree)]) == check_vllm.EXIT_CHANGED
    out = capsys.readouterr().out
    lines = {line.split()[2]: line.split()[0] for line in out.splitlines()
             if line.startswith("  ") and len(line.split()) > 2}
    assert lines["vllm.v1.worker.gpu_model_runner.GPUModelRunner.sample_tokens"] == "changed"
    assert lines["vllm.v1.worker.gpu_model_runner.GPUModelRunner._sync_device"] == "missing"
    assert lines["vllm.v1.worker.gpu_input_batch.InputBatch.req_id_to_index"] == "missing"
    assert lines["vllm.v1.worker.gpu_model_runner.GPUModelRunner._get_prompt_logprobs_dict"] == \
        "known"
    assert "--- known vllm.v1.worker.gpu_model_runner.GPUModelRunner.sample_tokens" in out
    assert "+    @staticmethod\n     def sample_tokens(" in out
    assert "1 changed, 2 missing" in out and "do not fit" in out


def test_wheel_and_sdist_are_read_without_installing(tmp_path, capsys):
    wheel = tmp_path / "vllm-9.9.9-cp38-abi3-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for rel, data in release_files().items():
            archive.writestr(rel, data)
        archive.writestr("vllm-9.9.9.dist-info/METADATA", "Metadata-Version: 2.1\n"
                         "Name: vllm\nVersion: 9.9.9\n\n")
    sdist = tmp_path / "vllm-9.9.9.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        files = {**release_files(), "PKG-INFO": b"Metadata-Version: 2.1\nName: vllm\n"
                 b"Version: 9.9.9\n\n"}
        for rel, data in files.items():
            info = tarfile.TarInfo(f"vllm-9.9.9/{rel}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    for release in (wheel, sdist):
        assert check_vllm.main([str(release)]) == check_vllm.EXIT_OK
        out = capsys.readouterr().out
        assert out.startswith(f"vLLM 9.9.9 ({release.name})")
        assert "0 changed, 0 missing" in out and "not yet listed" in out


@pytest.mark.parametrize("make, fragment", [
    (lambda tmp: tmp / "nothing-here", "no such file"),
    (lambda tmp: tmp, "no vllm/ package"),
    (lambda tmp: (tmp / "x.whl").write_text("not a zip") and tmp / "x.whl", "not a wheel"),
    (lambda tmp: (tmp / "x.txt").write_text("") or tmp / "x.txt", "expected a .whl"),
])
def test_bad_path_is_a_usage_error(tmp_path, capsys, make, fragment):
    assert check_vllm.main([str(make(tmp_path))]) == check_vllm.EXIT_USAGE
    assert fragment in capsys.readouterr().err


def test_check_vllm_runs_where_vllm_cannot_be_imported(tmp_path):
    script = ("import sys; sys.modules['vllm'] = None\n"  # any `import vllm` now fails
              "from fastpath.cli import main\n"
              f"sys.exit(main(['check-vllm', {str(copy_tree(tmp_path))!r}]))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "0 changed, 0 missing" in done.stdout
    assert json.loads(check_vllm.MANIFEST.read_text())["vllm_version"] in patches.SUPPORTED_VLLM
