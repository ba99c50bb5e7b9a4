"""The package shape STYLE.md asks for, held by tests: no import cycles, `fer`'s sub-packages
importing only down their layer order (docs/architecture.md), no `ray` in `fer/`, a YAML
space validated without torch, files and functions of a readable size, and the validation
names in `fer.names` equal to the registries that use them.

Modules are found by walking the package folders, so a new module (or a subpackage such
as `fer/data/`) is covered without editing this file.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

from support import ROOT

PACKAGES = ("fer", "search", "trainables")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_files(packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages."""
    return {module_name(path): path
            for package in packages for path in sorted((ROOT / package).rglob("*.py"))
            if "__pycache__" not in path.parts}


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


# --------------------------------------------------------------------------- import graph


def imported_modules(module: str, path: Path, known: set[str],
                     reexports: dict[str, dict[str, str]] | None = None) -> list[tuple[str, int]]:
    """(project module, line) for every import anywhere in the file, function-level ones
    included. `from pkg import name` counts as `pkg.name` when that is a module, as the
    owning module when `pkg` re-exports `name` lazily (`reexports`: package -> its
    `_EXPORTS`), else `pkg`; relative imports are resolved against the file's package."""
    reexports = reexports or {}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def deepest_known(dotted: str) -> str | None:
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in known:
                return ".".join(parts[:end])
        return None

    found = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known
                       else reexports.get(base, {}).get(alias.name, base) for alias in node.names]
        else:
            continue
        for target in targets:
            resolved = deepest_known(target)
            if resolved and resolved != module:
                found.append((resolved, node.lineno))
    return found


def lazy_reexports(files: dict[str, Path]) -> dict[str, dict[str, str]]:
    """package -> its `_EXPORTS` table (name -> owning module, fer.lazy's PEP 562 re-exports)."""
    tables = {}
    for name, path in files.items():
        if path.name != "__init__.py":
            continue
        for node in parse(path).body:
            target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
            if isinstance(target, ast.Name) and target.id == "_EXPORTS" and isinstance(node.value, ast.Dict):
                tables[name] = {key.value: value.value for key, value in zip(node.value.keys, node.value.values)}
    return tables


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], str]]:
    """Edges between project modules, and where each edge is written (file:line)."""
    files = product_files()
    reexports = lazy_reexports(files)
    graph: dict[str, set[str]] = {name: set() for name in files}
    where: dict[tuple[str, str], str] = {}
    for name, path in files.items():
        for target, line in imported_modules(name, path, set(files), reexports):
            graph[name].add(target)
            where.setdefault((name, target), f"{path.relative_to(ROOT)}:{line}")
    return graph, where


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components of more than one module, members sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def shortest_cycle(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside one component (breadth first)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node] & within):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    return []


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """For each cycle component, the shortest cycle through each member, rotations merged."""
    cycles, seen = [], set()
    for component in strongly_connected(graph):
        for start in component:
            cycle = shortest_cycle(graph, start, set(component))
            ring = cycle[:-1]
            key = min(tuple(ring[i:] + ring[:i]) for i in range(len(ring)))
            if key not in seen:
                seen.add(key)
                cycles.append(list(key) + [key[0]])
    return cycles


def test_cycle_finder_on_a_known_graph():
    graph = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert import_cycles(graph) == [["a", "b", "a"], ["a", "b", "c", "a"]]


def test_relative_and_from_imports_resolve(tmp_path):
    source = tmp_path / "__init__.py"
    source.write_text("from . import io\nfrom .io import write\nfrom fer import config\n"
                      "import fer.data.csv\ndef f():\n    from .. import config\n    from search.space import load_space\n")
    known = {"fer", "fer.data", "fer.data.io", "fer.config", "fer.data.csv", "search.space"}
    found = imported_modules("fer.data", source, known)
    assert [target for target, _ in found] == ["fer.data.io", "fer.data.io", "fer.config", "fer.data.csv",
                                               "fer.config", "search.space"]


def test_lazy_reexports_count_as_imports_of_their_owner(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from fer.train import fit\nfrom fer.train import config\nfrom fer.train import nope\n")
    known = {"fer.train", "fer.train.config", "fer.train.fitting", "fer.ssl.pipeline"}
    found = imported_modules("fer.ssl.pipeline", source, known, {"fer.train": {"fit": "fer.train.fitting"}})
    assert [target for target, _ in found] == ["fer.train.fitting", "fer.train.config", "fer.train"]


def test_no_import_cycles():
    """Function-level imports count: a lazy import inside a cycle is still a layering knot."""
    graph, where = import_graph()
    cycles = import_cycles(graph)
    lines = [" -> ".join(cycle) + "   [" + ", ".join(where[a, b] for a, b in zip(cycle, cycle[1:])) + "]"
             for cycle in cycles]
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(lines)


# --------------------------------------------------------------------------- layers

# fer's sub-packages, lowest first (docs/architecture.md draws them): a module imports
# modules of its own layer and of the layers below it, never above. "fer" is the layer of
# the top-level modules (fer/names.py, fer/io.py, fer/lazy.py) and of fer/__init__.py, whose
# re-exports are lazy. Chosen by measuring the import graph: the cut with the fewest arrows
# between sub-packages that still names the pipeline's parts.
LAYERS = ("fer", "fer.data", "fer.train", "fer.evaluate", "fer.ssl", "fer.export")
# Entry points are the top of the graph and may import anything: the `python -m` modules
# (`__main__`) and the CLI modules they run (`cli`: `python -m fer.train` runs the whole
# pipeline, fer.ssl included). No module imports one but its own package's `__init__` and
# `__main__` (STYLE.md: training must not import a CLI module).
ENTRY_POINTS = ("__main__", "cli")


def is_entry_point(module: str) -> bool:
    return module.rpartition(".")[2] in ENTRY_POINTS


def layer_of(module: str, layers: tuple[str, ...] = LAYERS) -> str:
    """The deepest layer that is `module` or contains it."""
    return max((layer for layer in layers if module == layer or module.startswith(layer + ".")), key=len)


def layer_arrows(graph: dict[str, set[str]], layers: tuple[str, ...] = LAYERS) -> list[tuple[str, str]]:
    """Every edge between two modules of different layers (entry points left out as sources)."""
    top = layers[0]
    return [(source, target) for source in sorted(graph) for target in sorted(graph[source])
            if (source == top or source.startswith(top + ".")) and (target == top or target.startswith(top + "."))
            and not is_entry_point(source) and layer_of(source, layers) != layer_of(target, layers)]


def arrows_up(graph: dict[str, set[str]], layers: tuple[str, ...] = LAYERS) -> list[tuple[str, str]]:
    rank = {layer: i for i, layer in enumerate(layers)}
    return [(source, target) for source, target in layer_arrows(graph, layers)
            if rank[layer_of(target, layers)] > rank[layer_of(source, layers)]]


def entry_point_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Edges into an entry point from anything but its own package's `__init__` or `__main__`."""
    return [(source, target) for source in sorted(graph) for target in sorted(graph[source])
            if is_entry_point(target) and source not in (target.rpartition(".")[0],
                                                          target.rpartition(".")[0] + ".__main__")]


def test_layer_checks_on_a_known_graph():
    layers = ("p", "p.low", "p.high")
    graph = {"p.io": set(), "p.low.a": {"p.io", "p.high.b"}, "p.high.b": {"p.low.a", "p.io"},
             "p.high.cli": {"p.high.b"}, "p.high.__main__": {"p.high.cli"}, "p.low.cli": {"p.high.b"},
             "p.low.c": {"p.low.cli"}}
    assert layer_of("p.io", layers) == "p" and layer_of("p.low", layers) == "p.low"
    assert arrows_up(graph, layers) == [("p.low.a", "p.high.b")]  # the CLIs may import up; p.low.c -> cli is level
    assert len(layer_arrows(graph, layers)) == 4  # low.a -> io, low.a -> high.b, high.b -> low.a, high.b -> io
    assert entry_point_imports(graph) == [("p.low.c", "p.low.cli")]


def test_every_subpackage_of_fer_has_a_layer():
    packages = {name for name, path in product_files(("fer",)).items() if path.name == "__init__.py"}
    assert packages == set(LAYERS), f"sub-packages without a layer: {sorted(packages - set(LAYERS))}; " \
                                    f"layers without a package: {sorted(set(LAYERS) - packages)}"


def test_no_imports_up_the_layers():
    """Function-level imports count, and so does a name imported through a lazy re-export."""
    graph, where = import_graph()
    up = arrows_up(graph)
    lines = [f"{source} ({layer_of(source)}) -> {target} ({layer_of(target)})   [{where[source, target]}]"
             for source, target in up]
    assert not up, f"{len(up)} import(s) up the layers {' < '.join(LAYERS)}:\n" + "\n".join(lines)


def test_only_their_package_imports_entry_points():
    graph, where = import_graph()
    found = entry_point_imports(graph)
    assert not found, "entry points imported by other modules:\n" + "\n".join(
        f"{source} -> {target}   [{where[source, target]}]" for source, target in found)


@pytest.mark.parametrize("package", LAYERS)
def test_every_package_init_says_what_it_owns_and_reexports_it(package):
    """One docstring per sub-package `__init__`; its lazy re-exports resolve inside the package."""
    path = product_files(("fer",))[package]
    assert (ast.get_docstring(parse(path)) or "").strip(), f"{path.relative_to(ROOT)} has no docstring"
    module = importlib.import_module(package)
    table = getattr(module, "_EXPORTS", {})
    outside = {name: owner for name, owner in table.items() if not owner.startswith(package + ".")}
    assert not outside, f"{package} re-exports names owned outside it: {outside}"
    assert set(table) <= set(module.__all__) and set(module.__all__) <= set(dir(module))
    for name in module.__all__:
        assert getattr(module, name) is not None


# --------------------------------------------------------------------------- ray stays at the edge


def ray_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")):
            names = [node.args[0].value]
        else:
            continue
        found += [f"{path.relative_to(ROOT)}:{node.lineno}: {name}"
                  for name in names if name == "ray" or name.startswith("ray.")]
    return found


def test_fer_imports_no_ray():
    offenders = [hit for path in product_files(("fer",)).values() for hit in ray_imports(path)]
    assert not offenders, "fer/ must not import ray (STYLE.md):\n" + "\n".join(offenders)


# --------------------------------------------------------------------------- light space validation

HEAVY = ("torch", "torchvision", "timm", "sklearn")

# Runs in a fresh interpreter; a meta-path spy records the project frames that first
# imported each heavy package, so a failure says where to look.
SPACE_PROBE = """
import json, sys, traceback
from pathlib import Path
root, heavy, first = sys.argv[1], sys.argv[2].split(","), {}

class Spy:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in heavy and top not in first:
            first[top] = [f"{Path(f.filename).relative_to(root)}:{f.lineno}" for f in traceback.extract_stack()
                          if f.filename.startswith(root) and "/.venv/" not in f.filename]
        return None

sys.meta_path.insert(0, Spy())
import search.space
for path in sorted(Path(root, "spaces").glob("*.yaml")):
    search.space.load_space(path)
print(json.dumps({name: first.get(name, []) for name in heavy if name in sys.modules}))
"""


def test_loading_every_space_imports_no_torch():
    """search.space validates a space before anything heavy starts (STYLE.md)."""
    out = subprocess.run([sys.executable, "-c", SPACE_PROBE, str(ROOT), ",".join(HEAVY)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    report = "\n".join(f"{name}, first imported via: {' <- '.join(reversed(stack)) or '?'}"
                       for name, stack in loaded.items())
    assert not loaded, "load_space imported heavy packages:\n" + report


# --------------------------------------------------------------------------- size


def test_files_are_at_most_400_lines():
    offenders = []
    for path in product_files().values():
        count = len(path.read_text().splitlines())
        if count > MAX_FILE_LINES:
            offenders.append(f"{path.relative_to(ROOT)}: {count} lines")
    assert not offenders, f"files over {MAX_FILE_LINES} lines:\n" + "\n".join(sorted(offenders))


def test_functions_are_at_most_60_lines():
    """A screen is the upper bound (STYLE.md, torchvision's train_one_epoch is about 50)."""
    offenders = []
    for path in product_files().values():
        for node in ast.walk(parse(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    offenders.append((size, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {size} lines"))
    lines = [text for _, text in sorted(offenders, reverse=True)]
    assert not offenders, f"{len(lines)} functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(lines)


# --------------------------------------------------------------------------- names == registries

# (fer.names tuple, the module that owns the registry, the registry's name there)
REGISTRIES = [
    ("LOSSES", "fer.train.losses", "LOSSES"),
    ("WEIGHT_SCHEMES", "fer.train.losses", "WEIGHT_SCHEMES"),
    ("MODELS", "fer.train.models", "MODELS"),
    ("STEMS", "fer.train.models", "STEMS"),
    ("POSTHOC", "fer.train.posthoc", "POSTHOC"),
    ("SELECTIONS", "fer.ssl.pseudo", "SELECTIONS"),
    ("PSEUDO_GRAPHS", "fer.ssl.propagate", "CANDIDATES"),
    ("SAMPLERS", "fer.train.samplers", "SAMPLERS"),
    ("AUGMENTS", "fer.train.transforms", "AUGMENTS"),
]


@pytest.mark.parametrize("names_tuple, module, registry", REGISTRIES, ids=[r[0] for r in REGISTRIES])
def test_names_equal_registry_keys(names_tuple, module, registry):
    from fer import names

    keys = tuple(getattr(importlib.import_module(module), registry))
    assert keys == getattr(names, names_tuple), f"{module}.{registry} keys {keys} != fer.names.{names_tuple}"


@pytest.mark.parametrize("names_tuple, module, registry", REGISTRIES, ids=[r[0] for r in REGISTRIES])
def test_every_registry_checks_itself_at_import(names_tuple, module, registry):
    """STYLE.md: each registry asserts at import that its keys equal its fer.names tuple, so
    the owning module has a top-level `check_registry(REGISTRY, names.TUPLE, ...)`, unless
    the registry is a plain tuple bound to the names tuple itself (`STEMS = names.STEMS`)."""
    path = product_files(("fer",))[module]
    body = parse(path).body
    calls = [node.value for node in body
             if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
             and ast.unparse(node.value.func).endswith("check_registry")]
    checked = {(ast.unparse(c.args[0]), ast.unparse(c.args[1]).rpartition(".")[2]) for c in calls if len(c.args) >= 2}
    checked |= {(node.targets[0].id, node.value.attr) for node in body
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Attribute) and ast.unparse(node.value.value) == "names"}
    assert (registry, names_tuple) in checked, (
        f"{path.relative_to(ROOT)} has no top-level check_registry({registry}, names.{names_tuple}, ...) "
        f"nor {registry} = names.{names_tuple}")


def test_check_registry_names_the_registry_that_drifted():
    from fer.names import LOSSES, check_registry

    check_registry(dict.fromkeys(LOSSES), LOSSES, "fer.train.losses.LOSSES")  # equal keys: silent
    with pytest.raises(RuntimeError) as info:
        check_registry({"ce": None, "hinge": None}, LOSSES, "fer.train.losses.LOSSES")
    message = str(info.value)
    assert "fer.train.losses.LOSSES" in message and "'hinge'" in message, message
    assert str(LOSSES) in message, message  # the names it should have had
    with pytest.raises(RuntimeError, match="fer.train.losses.LOSSES"):
        check_registry(dict.fromkeys(reversed(LOSSES)), LOSSES, "fer.train.losses.LOSSES")  # order is part of it
