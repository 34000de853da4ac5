"""`fastpath check-vllm PATH`: judge a vLLM release against fastpath's patches before installing it.

PATH is a vLLM wheel (`.whl`), a source distribution (`.tar.gz`) or a directory holding the
`vllm/` package (a source checkout, a site-packages). Nothing is installed or imported: each
function fastpath replaces or borrows is found in the release's source by its syntax tree,
fingerprinted exactly as the plugin fingerprints it at run time (sha256 of the text
`inspect.getsource` gives), and compared with the fingerprints fastpath was checked
against; each borrowed attribute is looked up. Per entry it prints `known`/`present`,
`changed` (with a unified diff against the known source) or `missing`; the exit code is 0
when everything is known, 1 when anything changed or is missing, 2 on a bad PATH.

What it checks comes from the ledger: every `Replacement` of every patch module and
`fastpath.patches.borrowed()`. Their known sources are stored in `fastpath/patches/known/`
(with `manifest.json`), so this command needs no vLLM at all. After changing the ledger
or accepting a new upstream version, regenerate them with the installed vLLM:

    python -m fastpath.tools.check_vllm --write-known
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import re
import sys
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastpath.source_text import (
    decode,
    directory_version,
    fingerprint_text,
    function_source,
    has_attribute,
    metadata_version,
    module_path,
)

KNOWN_DIR = Path(__file__).resolve().parents[1] / "patches" / "known"
MANIFEST = KNOWN_DIR / "manifest.json"
WRITE_COMMAND = "python -m fastpath.tools.check_vllm --write-known"
EXIT_OK, EXIT_CHANGED, EXIT_USAGE = 0, 1, 2


class TreeError(ValueError):
    """PATH is not something vLLM's source can be read from."""


@dataclass(frozen=True)
class Entry:
    """One thing a patch relies on: a replaced or borrowed function, or a borrowed attribute."""

    kind: str  # "replaced" | "borrowed"
    module: str
    qualname: str  # inside the module: "Class.function" or "Class.attribute"
    used_by: str
    fingerprints: tuple[str, ...]  # empty: an attribute, checked for presence

    @property
    def full_name(self) -> str:
        return f"{self.module}.{self.qualname}"

    def known_source_file(self, fingerprint: str) -> Path:
        return KNOWN_DIR / f"{self.full_name}-{fingerprint}.src"


@dataclass(frozen=True)
class Finding:
    """What the release has for one entry."""

    entry: Entry
    status: str  # "known" | "present" | "changed" | "missing"
    fingerprint: str | None = None
    source: str | None = None
    where: str = ""  # file (and line) in the release
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("known", "present")


class Tree:
    """The source files of a vLLM release: a wheel, an sdist or a directory; never installed."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.label = self.path.name
        if not self.path.exists():
            raise TreeError(f"{path}: no such file or directory")
        self._files: dict[str, Any] = {}
        if self.path.is_dir():
            root = self.path if (self.path / "vllm").is_dir() else None
            if root is None and self.path.name == "vllm" and (self.path / "__init__.py").exists():
                root = self.path.parent
            if root is None or not (root / "vllm" / "__init__.py").exists():
                raise TreeError(f"{path}: no vllm/ package in this directory")
            self._read = lambda rel: (root / rel).read_bytes() if (root / rel).is_file() else None
            self.version = directory_version(root)
        elif self.path.name.endswith(".whl"):
            self._open_wheel()
        elif self.path.name.endswith((".tar.gz", ".tgz")):
            self._open_sdist()
        else:
            raise TreeError(f"{path}: expected a .whl, a .tar.gz or a directory holding vllm/")

    def _open_wheel(self) -> None:
        try:
            archive = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as error:
            raise TreeError(f"{self.path}: not a wheel ({error})") from None
        names = set(archive.namelist())
        if "vllm/__init__.py" not in names:
            raise TreeError(f"{self.path}: this wheel has no vllm/ package")
        self._read = lambda rel: archive.read(rel) if rel in names else None
        metadata = [n for n in names if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        self.version = metadata_version(archive.read(metadata[0])) if metadata else "unknown"

    def _open_sdist(self) -> None:
        try:
            archive = tarfile.open(self.path)  # noqa: SIM115  read() uses it for the Tree's life
            members = {m.name: m for m in archive.getmembers() if m.isfile()}
        except tarfile.TarError as error:
            raise TreeError(f"{self.path}: not a source archive ({error})") from None
        inits = sorted((n for n in members if n.endswith("vllm/__init__.py")), key=len)
        if not inits:
            raise TreeError(f"{self.path}: this archive has no vllm/ package")
        prefix = inits[0][: -len("vllm/__init__.py")]

        def read(rel: str) -> bytes | None:
            member = members.get(prefix + rel)
            return None if member is None else archive.extractfile(member).read()

        self._read = read
        info = members.get(prefix + "PKG-INFO")
        self.version = (metadata_version(archive.extractfile(info).read()) if info
                        else "unknown")

    def file_bytes(self, rel: str) -> bytes | None:
        """A file of the release by its path from the repository root, or None."""
        return self._read(rel)

    def carries_series(self) -> bool:
        """Whether the release has fastpath's upstream series applied (`fastpath.upstream`)."""
        from fastpath import upstream

        return upstream.carries_series(self.file_bytes)

    def matching_series(self) -> str | None:
        """The release series of `fastpath.upstream` made from exactly this tree's files."""
        from fastpath import upstream

        return upstream.matching_series(self.file_bytes)

    def module_text(self, module: str) -> tuple[str, str] | None:
        """A module's source text and its path in the release, or None where it has none."""
        for rel in module_path(module):
            data = self._read(rel)
            if data is not None:
                return decode(data), rel
        return None


def load_manifest(path: Path = MANIFEST) -> tuple[dict[str, Any], list[Entry]]:
    """The stored ledger: where the known sources came from, and every entry."""
    manifest = json.loads(path.read_text())
    entries = [Entry(e["kind"], e["module"], e["qualname"], e["used_by"],
                     tuple(e["fingerprints"])) for e in manifest["entries"]]
    return manifest, entries


def ledger_entries() -> list[Entry]:
    """The entries of the live ledger (imports the installed vLLM through the patches)."""
    from fastpath import patches

    entries = [Entry("replaced", r.module, r.local_name, _patch_module_of(r),
                     tuple(sorted(r.known_fingerprints))) for r in patches.replacements(scope=None)]
    entries += [Entry("borrowed", b.module, b.qualname, b.used_by, tuple(sorted(b.fingerprints)))
                for b in patches.borrowed()]
    return entries


def _patch_module_of(replacement: Any) -> str:
    """The fastpath patch module whose REPLACEMENTS holds this replacement."""
    return replacement.new.__module__.rsplit(".", 1)[-1]


def assess(tree: Tree, entries: Sequence[Entry]) -> list[Finding]:
    """Find, fingerprint and judge every entry in the release's source."""
    findings = []
    for entry in entries:
        found = tree.module_text(entry.module)
        if found is None:
            findings.append(Finding(entry, "missing", detail=f"no module {entry.module}"))
            continue
        text, rel = found
        if not entry.fingerprints:
            cls, _, attr = entry.qualname.rpartition(".")
            present = has_attribute(text, cls, attr)
            findings.append(Finding(entry, "present" if present else "missing", where=rel,
                                    detail="" if present else f"{cls} defines no {attr}"))
            continue
        source = function_source(text, entry.qualname)
        if source is None:
            findings.append(Finding(entry, "missing", where=rel,
                                    detail=f"no definition of {entry.qualname}"))
            continue
        line = text[: text.find(source)].count("\n") + 1
        fingerprint = fingerprint_text(source)
        status = "known" if fingerprint in entry.fingerprints else "changed"
        findings.append(Finding(entry, status, fingerprint, source, f"{rel}:{line}"))
    return findings


def diff(finding: Finding) -> str:
    """Unified diff from the known source to the release's, or why there is none."""
    for fingerprint in finding.entry.fingerprints:
        known = finding.entry.known_source_file(fingerprint)
        if known.is_file():
            return "".join(difflib.unified_diff(
                known.read_text().splitlines(keepends=True),
                (finding.source or "").splitlines(keepends=True),
                fromfile=f"known {finding.entry.full_name} ({fingerprint})",
                tofile=f"release {finding.where} ({finding.fingerprint})"))
    return (f"    (no known source stored for {finding.entry.full_name}; "
            f"run `{WRITE_COMMAND}` with a known vLLM)\n")


def report(tree: Tree, findings: Sequence[Finding], manifest: dict[str, Any]) -> str:
    """The text check-vllm prints."""
    from fastpath.patches import SUPPORTED_VLLM

    lines = [f"vLLM {tree.version} ({tree.label}) against fastpath's ledger "
             f"(known sources from vLLM {manifest['vllm_version']})"]
    width = max(len(f.entry.full_name) for f in findings)
    for f in findings:
        note = {"known": f"fingerprint {f.fingerprint}", "present": "attribute present",
                "changed": f"fingerprint {f.fingerprint}, known "
                           f"{', '.join(f.entry.fingerprints)}",
                "missing": f.detail}[f.status]
        lines.append(f"  {f.status:<8} {f.entry.kind:<8} {f.entry.full_name:<{width}}  {note}")
    for f in findings:
        if f.status == "changed":
            lines.append("")
            lines.append(diff(f).rstrip("\n"))
    bad = [f for f in findings if not f.ok]
    counts = {s: sum(f.status == s for f in findings)
              for s in ("known", "present", "changed", "missing")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    if bad:
        lines.append(f"{summary}: fastpath's patches do not fit vLLM {tree.version}; "
                     "the plugin would refuse it")
    else:
        listed = ("" if tree.version in SUPPORTED_VLLM else
                  f" (not yet listed in fastpath.patches.SUPPORTED_VLLM: {SUPPORTED_VLLM})")
        lines.append(f"{summary}: every patched and borrowed name is known in "
                     f"vLLM {tree.version}{listed}")
    return "\n".join(lines)


def write_known(entries: Sequence[Entry] | None = None) -> list[Path]:
    """Store the installed vLLM's source of every fingerprinted entry, and the manifest."""
    import vllm

    from fastpath import patches

    entries = list(entries or ledger_entries())
    live = {r.qualname: r.original() for r in patches.replacements(scope=None)}
    KNOWN_DIR.mkdir(parents=True, exist_ok=True)
    written = []
    for entry in entries:
        if not entry.fingerprints:
            continue
        func = live.get(entry.full_name) or _resolve(entry)
        source = inspect.getsource(func)
        fingerprint = fingerprint_text(source)
        if fingerprint not in entry.fingerprints:
            raise SystemExit(f"{entry.full_name} in the installed vLLM {vllm.__version__} has "
                             f"fingerprint {fingerprint}, not a known one {entry.fingerprints}: "
                             "refusing to store it as known")
        path = entry.known_source_file(fingerprint)
        path.write_text(source)
        written.append(path)
    wanted = {entry.known_source_file(fp) for entry in entries for fp in entry.fingerprints}
    for stale in KNOWN_DIR.glob("*.src"):
        if stale not in wanted:
            stale.unlink()
    manifest = {
        "about": "What fastpath check-vllm judges a vLLM release by; generated by "
                 f"`{WRITE_COMMAND}` from the ledger (fastpath.patches).",
        "vllm_version": vllm.__version__,
        "entries": [{"kind": e.kind, "module": e.module, "qualname": e.qualname,
                     "used_by": e.used_by, "fingerprints": list(e.fingerprints)}
                    for e in entries],
    }
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    return [*written, MANIFEST]


def _resolve(entry: Entry) -> Any:
    import importlib

    target: Any = importlib.import_module(entry.module)
    for part in entry.qualname.split("."):
        target = inspect.getattr_static(target, part)
    return getattr(target, "__func__", target)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """check-vllm's arguments (also used by the `fastpath check-vllm` subcommand)."""
    parser.add_argument("path", nargs="?",
                        help="a vLLM wheel (.whl), sdist (.tar.gz), or a directory holding vllm/")
    parser.add_argument("--write-known", action="store_true",
                        help="store the installed vLLM's sources of the ledger's functions "
                        "as the known ones (after accepting a new upstream version)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastpath check-vllm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser)
    args = parser.parse_args(argv)
    if args.write_known:
        for path in write_known():
            print(f"wrote {path}")
        return EXIT_OK
    if not args.path:
        parser.error("give PATH: a vLLM wheel, sdist or a directory holding vllm/")
    try:
        tree = Tree(args.path)
    except TreeError as error:
        print(f"fastpath check-vllm: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if tree.carries_series():
        print(f"vLLM {tree.version} ({tree.label}): native: it carries fastpath's upstream "
              "series (TokensPrompt.target_token_ids, the V1 fixed-id scorer); the plugin "
              "stands aside there and patches nothing")
        return EXIT_OK
    manifest, entries = load_manifest()
    findings = assess(tree, entries)
    print(report(tree, findings, manifest))
    series = tree.matching_series()
    print(f"upstream series: the {series} series applies (every file it edits is identical)"
          if series else "upstream series: no series was made from these files; "
          "`fastpath upstream apply --check` tells whether one still applies")
    return EXIT_OK if all(f.ok for f in findings) else EXIT_CHANGED


if __name__ == "__main__":
    sys.exit(main())
