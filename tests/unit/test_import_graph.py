"""The import graph of the `fastpath` package, read with `ast` (nothing is imported, no engine).

Rules, each failure naming the modules (and the name) at fault:
- no import cycle between fastpath modules, counting imports inside functions too
  (`from fastpath import m` and `from fastpath.p import m` are edges to the module `m`;
  `from fastpath.m import name` is an edge to `fastpath.m`; relative imports are resolved);
- no module imports another module's private name: `from fastpath.m import _name` or
  `m._name` on an imported fastpath module, where `_name` has one leading underscore;
- a private module (`fastpath.p._m`) is imported only from inside its own package
  `fastpath.p` (its siblings and `fastpath.p` itself): it is that package's helper;
- product code does not import the test harness: only modules under `fastpath.testing`
  import `fastpath.testing`.
A module is a `.py` file in a directory with `__init__.py` all the way up to `fastpath/`;
`fastpath/engine_site/sitecustomize.py` is not one: engine processes load it as the
top-level `sitecustomize`, outside the package.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "fastpath"
TESTING = "fastpath.testing"


@dataclass(frozen=True)
class Edge:
    """One import: `importer` imports `module` (and, for `from module import name`, `name`)."""

    importer: str
    module: str
    name: str | None
    line: int


def package_modules(root: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Every module of the package under `root`, by dotted name."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        packages = [root.parent.joinpath(*parts[:i]) for i in range(1, len(parts))]
        if not all((p / "__init__.py").is_file() for p in packages):
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _package_of(module: str, path: Path) -> str:
    """The package a relative import in `module` starts from."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _bound_module(modules: dict[str, Path], dotted: str) -> str | None:
    """The longest prefix of `dotted` that is a fastpath module."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def _dotted(node: ast.expr) -> str | None:
    """`a.b.c` of a chain of attribute reads on a name; None for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _dotted(node.value)) is not None:
        return f"{base}.{node.attr}"
    return None


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def module_imports(modules: dict[str, Path], module: str) -> tuple[list[Edge], list[Edge]]:
    """The imports of one module: edges to fastpath modules, and private attributes read
    through an imported module (`m._name`, as edges naming `_name`)."""
    path = modules[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    edges: list[Edge] = []
    aliases: dict[str, str] = {}  # local name -> fastpath module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _bound_module(modules, alias.name)
                if target is None:
                    continue
                edges.append(Edge(module, target, None, node.lineno))
                if alias.asname:
                    aliases[alias.asname] = target
                else:
                    aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                base = _package_of(module, path).split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, source] if source else base)
            if _bound_module(modules, source) is None:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    edges.append(Edge(module, submodule, None, node.lineno))
                    aliases[alias.asname or alias.name] = submodule
                else:
                    edges.append(Edge(module, _bound_module(modules, source), alias.name,
                                      node.lineno))
    reads = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            dotted = _dotted(node.value)
            if dotted is None or dotted.split(".")[0] not in aliases:
                continue
            head, _, rest = dotted.partition(".")
            target = ".".join(filter(None, [aliases[head], rest]))
            if target in modules:
                reads.append(Edge(module, target, node.attr, node.lineno))
    return edges, reads


def import_graph() -> tuple[dict[str, set[str]], list[Edge]]:
    """Each module's fastpath imports (module -> modules), and every edge with its line."""
    modules = package_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    every: list[Edge] = []
    for module in modules:
        edges, reads = module_imports(modules, module)
        every += edges + reads
        graph[module] |= {e.module for e in edges if e.module != module}
    return graph, every


def cycle_groups(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def _cycle_through(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {group}")


def _in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_package_modules_are_found():
    modules = package_modules()
    assert {"fastpath", "fastpath.plugin", "fastpath.patches", "fastpath.cli"} <= set(modules)


def test_no_import_cycles():
    graph = import_graph()[0]
    found = [f"{', '.join(group)} (e.g. {' -> '.join(_cycle_through(graph, group))})"
             for group in cycle_groups(graph)]
    assert not found, "modules that import each other in fastpath:\n" + "\n".join(found)


def test_no_private_names_imported():
    _, edges = import_graph()
    bad = [f"{e.importer} (line {e.line}) imports {e.name} from {e.module}" for e in edges
           if e.name is not None and _private(e.name) and e.module != e.importer]
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


def test_private_modules_stay_in_their_package():
    _, edges = import_graph()
    bad = sorted({f"{e.importer} (line {e.line}) imports {e.module}, private to {package}"
                  for e in edges for package, _, leaf in [e.module.rpartition(".")]
                  if _private(leaf) and not _in_package(e.importer, package)})
    assert not bad, "private modules imported from outside their package:\n" + "\n".join(bad)


def test_product_code_does_not_import_the_test_harness():
    _, edges = import_graph()
    bad = sorted({f"{e.importer} (line {e.line}) imports {e.module}" for e in edges
                  if _in_package(e.module, TESTING) and not _in_package(e.importer, TESTING)})
    assert not bad, f"product code imports {TESTING}:\n" + "\n".join(bad)


# vLLM's request API: building a request's sampling parameters and handing requests to an
# engine. The patches (vLLM's own code, replaced) and the upstream series aside, product
# code reaches it through one module, so one place decides how a request is asked.
REQUEST_API_CALLS = ("SamplingParams", "generate", "enqueue")
REQUEST_API_MODULE = "fastpath.engine.scoring"
REQUEST_API_EXEMPT = ("fastpath.patches", "fastpath.upstream", TESTING)


def request_api_calls(path: Path) -> list[tuple[str, int]]:
    """`SamplingParams(...)`, `x.generate(...)` and `x.enqueue(...)` calls in a file (not
    `scoring.generate(...)`: that is the one module's own function)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else (
            func.attr if isinstance(func, ast.Attribute) else None)
        through_scoring = (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                           and func.value.id == REQUEST_API_MODULE.rpartition(".")[2])
        if name in REQUEST_API_CALLS and not through_scoring and (
                name == "SamplingParams" or isinstance(func, ast.Attribute)):
            found.append((name, node.lineno))
    return found


def test_one_product_module_calls_vllms_request_api():
    modules = package_modules()
    bad = [f"{module} (line {line}) calls {name}" for module, path in modules.items()
           if module != REQUEST_API_MODULE
           and not any(_in_package(module, p) for p in REQUEST_API_EXEMPT)
           for name, line in request_api_calls(path)]
    assert not bad, f"vLLM's request API outside {REQUEST_API_MODULE}:\n" + "\n".join(bad)
    assert request_api_calls(modules[REQUEST_API_MODULE]), "the check finds nothing at all"


# The package's layers, lowest first. A module imports only modules of its own layer or of a
# lower one, so each layer can be read, tested and replaced knowing only what is below it.
# Every module belongs to exactly one layer (the longest prefix listed decides), so a new
# module must be placed before this test passes.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("fastpath", "fastpath.extras", "fastpath.source_text", "fastpath.data", "fastpath.zoo"),
    ("fastpath.worker",),      # inside vLLM's engine processes; carried upstream
    ("fastpath.patches",),     # the ledger of vLLM code replaced
    ("fastpath.plugin",),      # vLLM's entry point: binds the ledger in every process
    ("fastpath.engine",),      # the one module that talks to vLLM, and the Scorer seam
    ("fastpath.metrics",),     # windows, conventions, perplexity, kld
    ("fastpath.server",),      # fastpath serve and its client
    ("fastpath.upstream",),    # the upstream series, generated from the worker layer
    ("fastpath.tools", "fastpath.lm_eval_model"),  # check-vllm, reports, lm-eval's model
    ("fastpath.cli",),         # the command line
    (TESTING,),                # the test harness (which nothing above imports)
)
MAX_TOP_LEVEL_MODULES = 8


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest prefix of `module` listed there."""
    matches = [(len(prefix), index) for index, layer in enumerate(LAYERS) for prefix in layer
               if _in_package(module, prefix) and (prefix != "fastpath" or module == prefix)]
    if not matches:
        raise LookupError(module)
    return max(matches)[1]


def test_every_module_has_a_layer():
    unplaced = [m for m in package_modules() if not _try_layer(m)]
    assert not unplaced, "modules in no layer (add them to LAYERS):\n" + "\n".join(unplaced)


def _try_layer(module: str) -> bool:
    try:
        layer_of(module)
    except LookupError:
        return False
    return True


def test_imports_go_down_the_layers():
    _, edges = import_graph()
    bad = sorted({f"{e.importer} (layer {layer_of(e.importer)}, line {e.line}) imports "
                  f"{e.module} (layer {layer_of(e.module)})" for e in edges
                  if layer_of(e.module) > layer_of(e.importer)})
    assert not bad, "imports that go up the layers:\n" + "\n".join(bad)


def test_the_layer_rule_can_fail():
    """The rule sees an upward import: the plugin importing the CLI would be one."""
    assert layer_of("fastpath.cli.ppl") > layer_of("fastpath.plugin")
    assert layer_of("fastpath.worker.targets") < layer_of("fastpath.engine.scoring")
    assert layer_of("fastpath.testing.peers") == len(LAYERS) - 1


def test_the_top_level_stays_small():
    top = sorted(p.name for p in PACKAGE_DIR.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} modules at fastpath/'s top: {top}"
