"""The upstream patch series (`fastpath.upstream`), without an engine.

One source of truth: the committed series must be exactly what `fastpath upstream refresh`
writes from fastpath's modules today, so the plugin and the series cannot drift. Then the
series applies to the installed release's files and makes them `native` (check-vllm, the
plugin), refuses a changed tree naming the patch, file and hunk, and `copy` never writes
through to the installed package. The series' behaviour is the correctness suite's, run
against a patched vLLM by `tox -e upstream`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from fastpath import upstream
from fastpath.source_text import directory_version
from fastpath.tools import check_vllm


def installed_version() -> str:
    return directory_version(upstream.installed_vllm().parent)


@pytest.fixture
def release_tree(tmp_path) -> Path:
    """The files the installed release's series edits, as installed, in a bare vllm/ tree."""
    version = installed_version()
    if version not in upstream.versions():
        pytest.skip(f"no series is kept for the installed vLLM {version}")
    installed = upstream.installed_vllm().parent
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("")
    for path in upstream.base_hashes(version):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(installed / path, tmp_path / path)
    return tmp_path


def created_files(patches: list[Path]) -> dict[str, str]:
    """The text of every file the patches create."""
    created = {}
    for patch in patches:
        for block in re.split(r"^diff --git ", patch.read_text(), flags=re.MULTILINE)[1:]:
            if "\nnew file mode" in block.split("@@", 1)[0]:
                name = block.split(" b/", 1)[1].split("\n", 1)[0]
                created[name] = "".join(line[1:] + "\n" for line in block.splitlines()
                                        if line.startswith("+") and not line.startswith("+++"))
    return created


def test_committed_series_is_what_refresh_writes(tmp_path):
    """Edit a shared module (fastpath/worker/targets.py, fixed_ids.py, ...) and this fails until
    `fastpath upstream refresh` is run and its result committed."""
    version = installed_version()
    if version not in upstream.versions():
        pytest.skip(f"no series is kept for the installed vLLM {version}")
    written = upstream.refresh(version, output=tmp_path)
    committed = upstream.SERIES_ROOT / version
    assert sorted(p.name for p in written) == sorted(p.name for p in committed.iterdir())
    for path in written:
        assert path.read_bytes() == (committed / path.name).read_bytes(), (
            f"{committed / path.name} is stale: run `fastpath upstream refresh` "
            f"(and with --tree for the other releases)")


def test_every_release_carries_the_same_generated_files():
    """The releases' series differ only in their hunks' context: what they add is the same."""
    versions = upstream.versions()
    assert len(versions) >= 2
    first = created_files(upstream.series_files(versions[0]))
    assert set(first) == {g.vllm_path for g in upstream.GENERATED}
    for version in versions[1:]:
        assert created_files(upstream.series_files(version)) == first, version


def test_series_applies_then_the_tree_is_native(release_tree, capsys):
    version = installed_version()
    assert upstream.matching_series(release_tree) == version
    assert check_vllm.main([str(release_tree)]) in (check_vllm.EXIT_OK, check_vllm.EXIT_CHANGED)
    assert f"the {version} series applies" in capsys.readouterr().out
    before = upstream.file_hashes(release_tree, list(upstream.base_hashes(version)))
    upstream.apply(release_tree, check_only=True)
    assert upstream.file_hashes(release_tree, list(before)) == before  # --check writes nothing
    used, files = upstream.apply(release_tree)
    assert used == version
    assert set(files) >= {g.vllm_path for g in upstream.GENERATED}
    assert upstream.carries_series(release_tree)
    assert check_vllm.main([str(release_tree)]) == check_vllm.EXIT_OK
    assert "native" in capsys.readouterr().out
    with pytest.raises(upstream.SeriesError, match="carries the fastpath series already"):
        upstream.apply(release_tree)


def test_a_changed_upstream_function_is_refused_naming_patch_file_and_hunk(release_tree):
    scheduler = release_tree / "vllm/v1/core/sched/scheduler.py"
    text = scheduler.read_text()
    anchor = "    def add_request(self, request: Request) -> None:\n"
    assert text.count(anchor) == 1
    scheduler.write_text(text.replace(anchor, anchor + "        self.seen = True\n"))
    before = upstream.file_hashes(release_tree, list(upstream.base_hashes(installed_version())))
    with pytest.raises(upstream.SeriesError) as refused:
        upstream.apply(release_tree)
    message = str(refused.value)
    assert re.search(r"0003-\S+\.patch: vllm/v1/core/sched/scheduler\.py: hunk #\d+ \(@@ ",
                     message), message
    assert upstream.file_hashes(release_tree, list(before)) == before  # nothing half-applied


def test_copy_never_writes_through_to_the_installed_package(tmp_path):
    installed = upstream.installed_vllm().parent
    version = installed_version()
    base = upstream.base_hashes(version)
    root = upstream.copy_installed(tmp_path / "patched")
    assert upstream.carries_series(root)
    assert upstream.file_hashes(installed, list(base)) == base
    assert all(upstream.file_hashes(root, [p])[p] != digest for p, digest in base.items())


def test_answers_compare_bitwise_across_builds(tmp_path, monkeypatch):
    """The record keys a request by what was asked and compares the bits it received;
    a one-ulp difference, or nothing answered under both builds, is refused."""
    import numpy as np

    from fastpath import patches

    base = str(tmp_path / "answers")
    monkeypatch.setenv(upstream.ANSWER_RECORD_ENV, base)
    scores = np.array([[-1.5], [-0.25]], dtype=np.float32)
    ids = np.array([[3], [4]])
    with pytest.raises(upstream.SeriesError, match="no answers recorded"):
        upstream.compare_answers(base)
    for native in (False, True):
        monkeypatch.setattr(patches, "native_support", lambda native=native: native)
        upstream.record_answer("isolated-cache", (1, 2, 3), 0, ids, 0, scores)
        upstream.record_answer("isolated-cache", (1, 2, 9), 0, ids, 0, scores)
    assert "2 requests answered under both" in upstream.compare_answers(base)
    one_ulp = scores.copy()
    one_ulp.view(np.uint32)[1, 0] += 1
    upstream.record_answer("isolated-cache", (1, 2, 3), 0, ids, 0, one_ulp)  # native again
    with pytest.raises(upstream.SeriesError, match="1 with different bits"):
        upstream.compare_answers(base)
