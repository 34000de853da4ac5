"""Find upstream definitions in source text, without importing it.

`fastpath check-vllm` judges a vLLM wheel or source tree that is not installed, so it
cannot call `inspect.getsource`. This module finds the same text from the module's source
alone: a function's lines exactly as `inspect.getsource` returns them (first decorator to
the end of the body, original indentation, trailing comments indented with the body, the
last newline kept), so a fingerprint taken here equals `fingerprint(func)` taken at run
time; and whether a class defines an attribute (a class-level name, a method or property,
or an assignment to `self.<name>` in any of its methods).
"""

from __future__ import annotations

import ast
import email.parser
import functools
import hashlib
import io
import re
import tokenize
from pathlib import Path


def fingerprint_text(source: str) -> str:
    """Short sha256 of a function's source text (what `_base.fingerprint` hashes)."""
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def decode(data: bytes) -> str:
    """Source bytes as Python reads them (coding cookie, universal newlines), like linecache."""
    encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    return "".join(io.TextIOWrapper(io.BytesIO(data), encoding=encoding).readlines())


@functools.lru_cache(maxsize=8)
def parse(text: str) -> ast.Module:
    """The module's syntax tree, kept for the next lookup in the same text."""
    return ast.parse(text)


def module_path(module: str) -> tuple[str, str]:
    """The two places a module's source can live, relative to the tree's root."""
    base = module.replace(".", "/")
    return f"{base}.py", f"{base}/__init__.py"


def _scope_body(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements of a scope, including those under if/try/with at that level (in order)."""
    found: list[ast.stmt] = []
    for node in body:
        found.append(node)
        if isinstance(node, ast.If | ast.With | ast.AsyncWith):
            found.extend(_scope_body(node.body) + _scope_body(getattr(node, "orelse", [])))
        elif isinstance(node, ast.Try | ast.TryStar):
            for part in (node.body, node.orelse, node.finalbody,
                         *(handler.body for handler in node.handlers)):
                found.extend(_scope_body(part))
    return found


def find(tree: ast.Module, qualname: str) -> ast.AST | None:
    """The definition of a dotted qualname (`Class.method`, `Outer.Inner.f`): the last one wins."""
    scope: ast.AST = tree
    for part in qualname.split("."):
        matches = [
            node for node in _scope_body(getattr(scope, "body", []))
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name == part
        ]
        if not matches:
            return None
        scope = matches[-1]
    return scope


def function_source(text: str, qualname: str) -> str | None:
    """The function's source as `inspect.getsource` gives it, or None where it is not defined."""
    node = find(parse(text), qualname)
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return None
    lines = text.splitlines(keepends=True)
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    last = node.end_lineno or node.lineno
    body = node.body[0]
    if lines[body.lineno - 1][: body.col_offset].strip() == "":  # the body has its own lines
        # inspect's block finder keeps comments after the last statement while they are
        # indented at least as deep as the body, up to the next line of code.
        for number in range(last + 1, len(lines) + 1):
            stripped = lines[number - 1].strip()
            if stripped and not stripped.startswith("#"):
                break
            indent = len(lines[number - 1]) - len(lines[number - 1].lstrip())
            if stripped.startswith("#") and indent >= body.col_offset:
                last = number
    return "".join(lines[first - 1 : last])


def _assigned_names(node: ast.AST) -> set[str]:
    """`self.<name>` assigned anywhere inside a function (targets of =, :=, +=, for, with)."""
    names: set[str] = set()
    for child in ast.walk(node):
        targets: list[ast.AST] = []
        if isinstance(child, ast.Assign):
            targets = list(child.targets)
        elif isinstance(child, ast.AnnAssign | ast.AugAssign | ast.For | ast.AsyncFor):
            targets = [child.target]
        elif isinstance(child, ast.withitem) and child.optional_vars is not None:
            targets = [child.optional_vars]
        for target in targets:
            for part in ast.walk(target):
                if (isinstance(part, ast.Attribute) and isinstance(part.value, ast.Name)
                        and part.value.id == "self"):
                    names.add(part.attr)
    return names


def has_attribute(text: str, class_qualname: str, name: str) -> bool:
    """Whether the class defines `name`: class-level, as a method/property, or as `self.name`."""
    node = find(parse(text), class_qualname)
    if not isinstance(node, ast.ClassDef):
        return False
    for statement in _scope_body(node.body):
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if statement.name == name:
                return True
            if not isinstance(statement, ast.ClassDef) and name in _assigned_names(statement):
                return True
        elif isinstance(statement, ast.AnnAssign | ast.AugAssign):
            if isinstance(statement.target, ast.Name) and statement.target.id == name:
                return True
        elif isinstance(statement, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name
                for target in statement.targets for t in ast.walk(target)):
            return True
    return False


def metadata_version(data: bytes) -> str:
    """The `Version` of a distribution's METADATA (or an sdist's PKG-INFO)."""
    return email.parser.BytesHeaderParser().parsebytes(data).get("Version", "unknown")


def directory_version(root: Path) -> str:
    """The vLLM version of a directory holding `vllm/`: its dist-info, else
    `vllm/_version.py`, else "unknown"."""
    for info in sorted(root.glob("vllm*.dist-info/METADATA")):
        return metadata_version(info.read_bytes())
    version_file = root / "vllm" / "_version.py"
    if version_file.is_file():
        found = re.search(r"""__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""",
                          version_file.read_text())
        if found:
            return found.group(1)
    return "unknown"
