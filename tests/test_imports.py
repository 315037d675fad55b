"""Guards DESIGN.md's arrows: which jaxfuse modules may import which, read with `ast` (nothing is imported).

No import cycles, no forbidden arrows between layers, collectives only in the layers and `jaxfuse.parallel`, no
torch or diffusers in the runtime outside the oracle modules, and tests and benchmarks that do not import each other.
"""

from __future__ import annotations

import ast
import functools
import itertools
import re
import subprocess
import sys
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED_PACKAGES = ("jaxfuse", "checkpoints_conversion")
LAZY_PACKAGES = {"jaxfuse"}  # loads its public names through importlib strings: it imports nothing

# importer prefix -> prefixes of the modules it must not import (the first row covers every jaxfuse module)
FORBIDDEN_IMPORTS = {
    "jaxfuse": ("checkpoints_conversion",),
    "jaxfuse.models": ("jaxfuse.pipeline", "jaxfuse.sampling", "jaxfuse.analysis", "jaxfuse.generate", "jaxfuse.spec",
                       "jaxfuse.stream", "jaxfuse.serve", "jaxfuse.commands", "jaxfuse.runtime"),
    "jaxfuse.parallel": ("jaxfuse.models", "jaxfuse.sampling", "jaxfuse.pipeline", "jaxfuse.analysis",
                         "jaxfuse.commands", "jaxfuse.runtime"),
    "jaxfuse.checkpoint": ("jaxfuse.models", "jaxfuse.parallel", "jaxfuse.sampling", "jaxfuse.pipeline",
                           "jaxfuse.commands"),
    "jaxfuse.weight_conversion": ("jaxfuse.models", "jaxfuse.parallel", "jaxfuse.sampling", "jaxfuse.pipeline",
                                  "jaxfuse.commands"),
    # Single-file checkpoints: names and shapes to configs and tensors, like the folder reader beside it.
    "jaxfuse.single_file": ("jaxfuse.models", "jaxfuse.parallel", "jaxfuse.sampling", "jaxfuse.pipeline",
                            "jaxfuse.commands", "jaxfuse.spec", "jaxfuse.runtime"),
    "jaxfuse.clip_tokenizer": ("jaxfuse.models", "jaxfuse.parallel", "jaxfuse.sampling", "jaxfuse.pipeline",
                               "jaxfuse.commands", "jaxfuse.spec", "jaxfuse.runtime", "jaxfuse.checkpoint"),
    "jaxfuse.lora": ("jaxfuse.models", "jaxfuse.parallel", "jaxfuse.sampling", "jaxfuse.pipeline", "jaxfuse.commands"),
    "jaxfuse.config": ("jaxfuse.checkpoint", "jaxfuse.weight_conversion", "jaxfuse.models", "jaxfuse.parallel",
                       "jaxfuse.sampling", "jaxfuse.pipeline", "jaxfuse.commands"),
    "jaxfuse.text_encoder_config": ("jaxfuse.checkpoint", "jaxfuse.weight_conversion", "jaxfuse.models",
                                    "jaxfuse.parallel", "jaxfuse.sampling", "jaxfuse.pipeline", "jaxfuse.commands"),
    "jaxfuse.parallel_config": ("jaxfuse.checkpoint", "jaxfuse.weight_conversion", "jaxfuse.models",
                                "jaxfuse.parallel", "jaxfuse.sampling", "jaxfuse.pipeline", "jaxfuse.commands"),
    # DeepCache's settings and schedules: plain data both the UNet and the step plan read.
    "jaxfuse.step_cache": ("jaxfuse.checkpoint", "jaxfuse.weight_conversion", "jaxfuse.models", "jaxfuse.parallel",
                           "jaxfuse.sampling", "jaxfuse.pipeline", "jaxfuse.commands", "jaxfuse.runtime"),
    "jaxfuse.sampling": ("jaxfuse.pipeline", "jaxfuse.generate", "jaxfuse.analysis", "jaxfuse.stream",
                         "jaxfuse.commands", "jaxfuse.runtime", "jaxfuse.spec"),
    "jaxfuse.analysis": ("jaxfuse.pipeline", "jaxfuse.runtime", "jaxfuse.generate", "jaxfuse.stream",
                         "jaxfuse.commands"),
    # Compiling, timing and placing: what the pipeline and the stream run through, knowing neither.
    "jaxfuse.runtime": ("jaxfuse.pipeline", "jaxfuse.generate", "jaxfuse.stream", "jaxfuse.serve", "jaxfuse.commands",
                        "jaxfuse.spec"),
    # A model folder's configs and the checks of a request's values: nothing that runs a model.
    "jaxfuse.spec": ("jaxfuse.models", "jaxfuse.parallel", "jaxfuse.sampling", "jaxfuse.runtime", "jaxfuse.pipeline",
                     "jaxfuse.analysis", "jaxfuse.generate", "jaxfuse.stream", "jaxfuse.serve", "jaxfuse.commands"),
    "jaxfuse.pipeline": ("jaxfuse.generate", "jaxfuse.stream", "jaxfuse.serve", "jaxfuse.commands"),
    # The commands' helpers: only commands import them.
    "jaxfuse.commands": ("jaxfuse.generate", "jaxfuse.stream", "jaxfuse.serve"),
    "jaxfuse.stream": ("jaxfuse.generate", "jaxfuse.serve"),  # what the commands share lives in `commands`
    # The image server: HTTP over the pipeline, beside the two other commands.
    "jaxfuse.serve": ("jaxfuse.generate", "jaxfuse.stream"),
    "jaxfuse.outputs": ("jaxfuse.models", "jaxfuse.parallel", "jaxfuse.sampling", "jaxfuse.pipeline", "jaxfuse.spec",
                        "jaxfuse.commands"),
    "jaxfuse.images": ("jaxfuse",),  # a leaf: numpy and Pillow only, shared by the commands and the stream
    "jaxfuse.control_images": ("jaxfuse",),  # a leaf: numpy and Pillow (OpenCV inside a function), the preprocessors
}

COLLECTIVES = {"ppermute", "all_gather", "psum", "pmean", "pmax", "pmin", "psum_scatter", "all_to_all", "axis_index",
               "axis_size", "pshuffle", "pswapaxes"}
COLLECTIVE_OWNERS = ("jaxfuse.models.layers", "jaxfuse.parallel")

ORACLE_MODULES = {"jaxfuse.oracle", "jaxfuse.demo.architecture", "jaxfuse.demo.train"}
ORACLE_PACKAGES = {"torch", "diffusers"}

ImportNode = ast.Import | ast.ImportFrom


@dataclass(frozen=True)
class Edge:
    """One resolved import: `importer` loads `target` by `statement` at `path:line`."""

    importer: str
    target: str
    path: Path
    line: int
    statement: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.statement}"


# --- reading the files ---------------------------------------------------------------------------------------------


def python_files(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path) -> str:
    """The package that relative imports in `path` start from."""
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


@functools.cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def import_nodes(tree: ast.AST) -> list[ImportNode]:
    """Every import statement, inside functions too, in line order."""
    nodes = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    return sorted(nodes, key=lambda node: node.lineno)


def walk_outside_functions(node: ast.AST) -> Iterator[ast.AST]:
    """The nodes that run when the module is imported: everything but function bodies."""
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield child
            yield from walk_outside_functions(child)


# --- resolving imports -------------------------------------------------------------------------------------------


def matches(name: str, prefix: str) -> bool:
    """`prefix` names `name` or a package above it: jaxfuse.models matches jaxfuse.models.unet, not jaxfuse.modelsx."""
    return name == prefix or name.startswith(prefix + ".")


def from_base(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a `from ... import` reads from, relative imports resolved against `package`."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def longest_known_prefix(name: str, known: Iterable[str]) -> str | None:
    candidates = [module for module in known if matches(name, module)]
    return max(candidates, key=len, default=None)


def import_targets(node: ImportNode, package: str, known: set[str]) -> list[str]:
    """The modules of `known` that an import statement loads.

    `from a import b` loads the module a.b if there is one, else a; `import a.b.c` loads the longest known prefix.
    """
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = from_base(node, package)
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    return [target for target in (longest_known_prefix(name, known) for name in names) if target]


def top_level_package(node: ImportNode) -> list[str]:
    """The first component of each absolute name an import statement reads (relative imports give none)."""
    if isinstance(node, ast.Import):
        return [alias.name.partition(".")[0] for alias in node.names]
    return [node.module.partition(".")[0]] if node.module and not node.level else []


@functools.cache
def scanned_modules() -> dict[str, Path]:
    return {module_name(path): path for path in python_files(*SCANNED_PACKAGES)}


def edges_of(path: Path, known: set[str]) -> list[Edge]:
    """The imports in `path` of the modules in `known`, self-imports left out."""
    importer, package = module_name(path), package_of(path)
    return [Edge(importer, target, path, node.lineno, ast.unparse(node))
            for node in import_nodes(parse(path))
            for target in import_targets(node, package, known) if target != importer]


@functools.cache
def package_edges() -> tuple[Edge, ...]:
    modules = scanned_modules()
    known = set(modules)
    return tuple(edge for name, path in modules.items() if name not in LAZY_PACKAGES for edge in edges_of(path, known))


def graph_of(edges: Iterable[Edge]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in edges:
        graph[edge.importer].add(edge.target)
    return dict(graph)


def statements_for(importer: str, target: str) -> list[Edge]:
    return [edge for edge in package_edges() if (edge.importer, edge.target) == (importer, target)]


# --- the checks, on plain graphs so they can be tried on synthetic ones ----------------------------------------------


def reachable(graph: Mapping[str, Iterable[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in graph.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def shortest_cycle(graph: Mapping[str, Iterable[str]], start: str) -> list[str]:
    """The shortest chain start -> ... -> start (breadth first); `start` must lie on a cycle."""
    parents: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                chain = [node]
                while chain[-1] != start:
                    chain.append(parents[chain[-1]])
                return [*reversed(chain), start]
            if nxt not in parents:
                parents[nxt] = node
                queue.append(nxt)
    raise ValueError(f"{start} is on no cycle")


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One shortest cycle per group of mutually importing modules, as a chain a -> b -> a."""
    reach = {node: reachable(graph, node) for node in graph}
    cycles, covered = [], set()
    for node in sorted(graph):
        if node in reach[node] and node not in covered:
            covered |= {other for other in reach[node] if node in reach.get(other, ())}
            cycles.append(shortest_cycle(graph, node))
    return cycles


def forbidden_arrows(graph: Mapping[str, Iterable[str]],
                     rules: Mapping[str, Iterable[str]] = FORBIDDEN_IMPORTS) -> list[tuple[str, str, str]]:
    """(importer, target, rule) for each import a rule forbids, `rule` saying 'importer prefix -/-> prefix'."""
    found = []
    for importer, targets in sorted(graph.items()):
        for target in sorted(targets):
            broken = [f"{owner} -/-> {banned}" for owner, banned_list in rules.items() if matches(importer, owner)
                      for banned in banned_list if matches(target, banned)]
            if broken:
                found.append((importer, target, "; ".join(broken)))
    return found


def report(headline: str, lines: Iterable[str]) -> str:
    return "\n".join([headline, *(f"  {line}" for line in lines)])


# --- the rules on the current tree ------------------------------------------------------------------------------


def test_scan_sees_the_package():
    modules = scanned_modules()
    assert {"jaxfuse", "jaxfuse.models.unet", "jaxfuse.parallel.patch", "checkpoints_conversion"} <= set(modules)
    assert any(edge.importer == "jaxfuse.models.unet" for edge in package_edges())


def test_no_import_cycles():
    lines = []
    for cycle in find_cycles(graph_of(package_edges())):
        lines.append(" -> ".join(cycle))
        lines += [f"    {edge}" for a, b in itertools.pairwise(cycle) for edge in statements_for(a, b)]
    assert not lines, report("Import cycles (break one import of each):", lines)


def test_no_forbidden_arrows():
    lines = [f"{edge}   ({rule})" for importer, target, rule in forbidden_arrows(graph_of(package_edges()))
             for edge in statements_for(importer, target)]
    assert not lines, report("Imports against DESIGN.md's arrows:", lines)


def collective_calls(tree: ast.AST) -> list[ast.Call]:
    """Calls of a collective: `lax.psum(...)`, `jax.lax.all_gather(...)`, or a bare `psum(...)` from jax.lax."""
    bare = {alias.asname or alias.name for node in import_nodes(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "jax.lax"
            for alias in node.names if alias.name in COLLECTIVES}

    def is_collective(func: ast.expr) -> bool:
        return (isinstance(func, ast.Attribute) and func.attr in COLLECTIVES) or (
            isinstance(func, ast.Name) and func.id in bare)

    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and is_collective(node.func)]
    return sorted(calls, key=lambda call: call.lineno)


def test_collectives_only_in_layers_and_parallel():
    lines = [f"{path.relative_to(ROOT)}:{call.lineno}: {ast.unparse(call.func)}(...)"
             for path in python_files("jaxfuse")
             if not any(matches(module_name(path), owner) for owner in COLLECTIVE_OWNERS)
             for call in collective_calls(parse(path))]
    assert not lines, report(f"Collectives outside {', '.join(COLLECTIVE_OWNERS)}:", lines)


def module_level_oracle_imports(tree: ast.AST) -> list[ImportNode]:
    """Imports of torch or diffusers that run when the module is imported (not those inside functions)."""
    return [node for node in walk_outside_functions(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
            and ORACLE_PACKAGES & set(top_level_package(node))]


def test_runtime_does_not_import_torch_or_diffusers():
    lines = [f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}"
             for path in python_files("jaxfuse") if module_name(path) not in ORACLE_MODULES
             for node in module_level_oracle_imports(parse(path))]
    assert not lines, report(f"torch/diffusers imported at module level outside {sorted(ORACLE_MODULES)}:", lines)


def modules_in_tests_folder(prefix: str = "") -> set[str]:
    """Names that load a module of tests/ whose stem starts with `prefix`, plain (via sys.path) or as tests.<stem>."""
    stems = {path.stem for path in (ROOT / "tests").glob(f"{prefix}*.py")}
    return stems | {f"tests.{stem}" for stem in stems}


def imports_of(paths: Iterable[Path], known: set[str]) -> list[str]:
    return [str(edge) for path in paths for edge in edges_of(path, known)]


def test_test_modules_do_not_import_each_other():
    lines = imports_of(sorted((ROOT / "tests").glob("test_*.py")), modules_in_tests_folder("test_"))
    assert not lines, report("Test modules importing test modules (move the shared helper out):", lines)


def names_tests_folder(value: object) -> bool:
    return isinstance(value, str) and "tests" in re.split(r"[\\/]", value)


def sys_path_edits(tree: ast.AST) -> list[ast.AST]:
    """`sys.path.insert/append/...(...)` calls and `sys.path` assignments that mention a tests folder."""
    def touches_sys_path(node: ast.AST) -> bool:
        if isinstance(node, ast.Call):
            return ast.unparse(node.func).startswith("sys.path.")
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            return any(ast.unparse(target).startswith("sys.path") for target in targets)
        return False

    return [node for node in ast.walk(tree) if touches_sys_path(node)
            and any(isinstance(sub, ast.Constant) and names_tests_folder(sub.value) for sub in ast.walk(node))]


def test_benchmarks_do_not_reach_into_tests():
    paths = python_files("benchmarks")
    lines = imports_of(paths, modules_in_tests_folder() | {"tests"})
    lines += [f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}"
              for path in paths for node in sys_path_edits(parse(path))]
    assert not lines, report("Benchmarks reaching into tests/ (import the helpers from jaxfuse instead):", lines)


# --- the checker itself can fail -----------------------------------------------------------------------------------


def test_checker_catches_synthetic_violations():
    cyclic = {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a", "pkg.c"}, "pkg.c": set(), "pkg.d": {"pkg.a"}}
    assert find_cycles(cyclic) == [["pkg.a", "pkg.b", "pkg.a"]]
    assert find_cycles({"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}}) == []

    graph = {"jaxfuse.models.unet": {"jaxfuse.pipeline", "jaxfuse.config"}, "jaxfuse.modelsx": {"jaxfuse.pipeline"}}
    assert forbidden_arrows(graph) == [("jaxfuse.models.unet", "jaxfuse.pipeline",
                                        "jaxfuse.models -/-> jaxfuse.pipeline")]
    assert forbidden_arrows({"jaxfuse.images": {"jaxfuse.spec"}}) == [("jaxfuse.images", "jaxfuse.spec",
                                                                       "jaxfuse.images -/-> jaxfuse")]

    known = {"jaxfuse", "jaxfuse.parallel", "jaxfuse.parallel.patch", "jaxfuse.models.layers"}
    source = "from jaxfuse.parallel import patch, PATCH\nfrom ..models.layers import conv\nimport jaxfuse.parallel.x"
    nodes = import_nodes(ast.parse(source))
    targets = [target for node in nodes for target in import_targets(node, "jaxfuse.sampling", known)]
    assert targets == ["jaxfuse.parallel.patch", "jaxfuse.parallel", "jaxfuse.models.layers", "jaxfuse.parallel"]
    assert len(collective_calls(ast.parse("from jax.lax import psum as s\ns(x, 'p')\njax.lax.all_gather(x)"))) == 2
    oracle = "import torch.nn\ntry:\n    from diffusers import X\nexcept ImportError:\n    X = None\n"
    oracle += "def f():\n    import torch"
    assert [node.lineno for node in module_level_oracle_imports(ast.parse(oracle))] == [1, 3]
    assert len(sys_path_edits(ast.parse("sys.path.insert(0, str(ROOT / 'tests'))\nsys.path.append('src')"))) == 1


def test_public_api_is_one_light_import():
    """`import jaxfuse` loads none of the heavy dependencies; each public name then resolves."""
    code = ("import sys, jaxfuse; heavy = sorted(m for m in ('jax', 'transformers', 'orbax', 'flax') "
            "if m in sys.modules); names = [getattr(jaxfuse, n).__name__ for n in jaxfuse.__all__]; "
            "print(heavy, len(names))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.split() == ["[]", "19"]
