"""Tier 1: the package's import graph, read from the source with `ast` (nothing is imported): no cycle, and no import
from a lower layer up to a higher one, whether at module level or inside a function.

`python tests/test_imports.py` prints the graph's figures (modules, edges, imports inside functions).
"""
from __future__ import annotations

import ast
import pathlib
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "megatrain"

# The layers, bottom first. A module may import from its own layer and the ones below, never from one above. A key
# names a module or a package (all its modules); the longest key that matches a module places it, and every module
# must be placed (a new one is added here, where it belongs). "megatrain" is the package's own __init__ only.
LAYERS = [
    # leaves, importing no other megatrain module: the version, the compiled kernels, file and cache helpers, fault
    # injection, this machine's cores, a parameter's full size and decay rule, the CPU's linear products
    ("megatrain", "megatrain._C", "megatrain.fileio", "megatrain.faults", "megatrain.hostinfo", "megatrain.parameters",
     "megatrain.startup", "megatrain.cpu_linear"),
    ("megatrain.model_config",),  # the model section of the config, its sizes and checks
    ("megatrain.config_checks",),  # the config's combination checks (of typed sections it does not import)
    ("megatrain.config", "megatrain.config_docs", "megatrain.resolved"),  # the typed config, its reference page, and
    # what a run derives from it (saved beside it in checkpoints)
    # the data path, the fused kernels, the built-in corpus, the FLOP formulas and Slurm node lists: over the config
    ("megatrain.data", "megatrain.kernels", "megatrain.corpus", "megatrain.flops", "megatrain.launch.hostfile"),
    ("megatrain.model", "megatrain.moe", "megatrain.heads", "megatrain.decode_matmul"),  # the plain Transformer, its
    # MoE layers, task heads, LoRA, the decoding products
    ("megatrain.parallel",),  # layout, TP layers, parallelize: rewrites the model, knows nothing of training
    ("megatrain.checkpoint",),  # save/resume, the one reader, Hugging Face names
    ("megatrain.tasks",),  # one object per objective: batches, loss, FLOPs, metrics
    ("megatrain.training",),  # the run's wiring, the engine, the loop, throughput and logging
    ("megatrain.planning",),  # memory and step time of what training would do
    # the commands' modules: `megatrain <command>` (a command whose module needs nothing above its own layer lives
    # there: data/preprocess.py, launch/hostfile.py, kernels/__main__.py)
    ("megatrain.pretrain", "megatrain.finetune", "megatrain.generate", "megatrain.predict", "megatrain.evaluate",
     "megatrain.lmeval", "megatrain.plan", "megatrain.plot", "megatrain.convert", "megatrain.launch",
     "megatrain.serve"),
    # what the user runs: the CLI and the `python -m` faces (a module's `if __name__ == "__main__":` block counts here)
    ("megatrain.cli", "megatrain.__main__", "megatrain.convert.__main__"),
]
SCRIPT = "<python -m>"  # stands for the `if __name__ == "__main__":` blocks: the top layer
EXTENSIONS = {"megatrain._C"}  # compiled, no .py: importable, so a module of the graph

# Upward imports that are known and tolerated, each with the reason: (importer, imported).
ALLOWED_UP: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int
    in_function: bool


def module_names() -> dict[str, pathlib.Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _is_main_block(node: ast.AST) -> bool:
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
            and len(t.comparators) == 1 and isinstance(t.comparators[0], ast.Constant)
            and t.comparators[0].value == "__main__")


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement may load: `from a.b import c` loads a.b, and a.b.c if c is a module."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importing module's package, up level - 1
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    return [base] + [f"{base}.{a.name}" for a in node.names]


def imports_in(tree: ast.AST, module: str, is_package: bool):
    """(importer, names the statement may load, line, inside a function) for every import statement of a module;
    the importer is the module, or SCRIPT in its `if __name__ == "__main__":` block."""
    def visit(node: ast.AST, importer: str, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield importer, _targets(child, module, is_package), child.lineno, in_function
            elif _is_main_block(child) and not in_function:
                yield from visit(child, SCRIPT, False)
            else:
                yield from visit(child, importer, in_function or isinstance(
                    child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    yield from visit(tree, module, False)


def import_graph() -> tuple[list[Edge], list[tuple[str, int, str]]]:
    """Every import of a megatrain module by a megatrain module (the `if __name__ == "__main__":` blocks as SCRIPT's),
    and every import statement inside a function: (module, line, first name it imports)."""
    names = module_names()
    known = set(names) | EXTENSIONS
    edges, in_functions = [], []
    for module, path in names.items():
        tree = ast.parse(path.read_text(), str(path))
        for importer, targets, line, in_function in imports_in(tree, module, path.name == "__init__.py"):
            if in_function:
                in_functions.append((module, line, targets[0]))
            # `from a import b` runs a (its __init__ for a package), and a.b when b is a module: an edge to each
            found = [t for t in targets if t in known]
            if targets[0].startswith("megatrain") and not found:
                raise AssertionError(f"{path}:{line}: {targets[0]} is no megatrain module")
            edges.extend(Edge(importer, t, line, in_function) for t in found if t != importer)
    return edges, in_functions


def layer_of(module: str) -> int:
    if module == SCRIPT:
        return len(LAYERS) - 1
    best, depth = None, -1
    for i, keys in enumerate(LAYERS):
        for key in keys:
            matches = module == key or (key != "megatrain" and module.startswith(key + "."))
            if matches and key.count(".") > depth:
                best, depth = i, key.count(".")
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return best


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.importer, set()).add(e.imported)
        graph.setdefault(e.imported, set())
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
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
                        found.append(sorted(component))
    return found


def test_every_module_has_a_layer():
    for module in module_names():
        layer_of(module)


def test_no_import_cycle():
    """No cycle among module-level imports, nor once the imports inside functions are counted too (a cycle hidden in
    a function is still two modules that need each other)."""
    edges, _ = import_graph()
    at_module_level = cycles([e for e in edges if not e.in_function])
    assert not at_module_level, f"import cycles at module level: {at_module_level}"
    counting_functions = cycles(edges)
    assert not counting_functions, f"import cycles through imports inside functions: {counting_functions}"


def test_no_import_from_a_lower_layer_up():
    edges, _ = import_graph()
    up = sorted({f"{e.importer} (layer {layer_of(e.importer)}) imports {e.imported} (layer {layer_of(e.imported)}) "
                 f"at line {e.line}{' inside a function' if e.in_function else ''}"
                 for e in edges if layer_of(e.imported) > layer_of(e.importer)
                 and (e.importer, e.imported) not in ALLOWED_UP})
    assert not up, "imports from a lower layer up:\n" + "\n".join(up)


def test_the_allowed_upward_imports_still_exist():
    """An entry of ALLOWED_UP whose import is gone is removed, so the list never outlives its reason."""
    edges, _ = import_graph()
    assert ALLOWED_UP <= {(e.importer, e.imported) for e in edges}


def test_the_graph_sees_imports_at_every_depth():
    """The reader's own check on a made-up module: module level, inside a function, inside a nested function and a
    method, a relative import, and a `__main__` block (the script's, not the module's)."""
    source = ("import megatrain.config\n"
              "def f():\n    from megatrain.model import Transformer\n"
              "    def g():\n        from . import flops\n"
              "class C:\n    def h(self):\n        import megatrain.training.runtime\n"
              "if __name__ == '__main__':\n    from megatrain.cli import main\n")
    seen = [(importer, targets[0], line, in_function)
            for importer, targets, line, in_function in imports_in(ast.parse(source), "megatrain.example", False)]
    assert seen == [("megatrain.example", "megatrain.config", 1, False), ("megatrain.example", "megatrain.model", 3, True),
                    ("megatrain.example", "megatrain", 5, True), ("megatrain.example", "megatrain.training.runtime", 8, True),
                    (SCRIPT, "megatrain.cli", 10, False)]


if __name__ == "__main__":
    edges, in_functions = import_graph()
    own = [x for x in in_functions if x[2].startswith("megatrain")]
    print(f"{len(module_names())} modules, {len({(e.importer, e.imported) for e in edges})} import edges, "
          f"{len(in_functions)} import statements inside functions ({len(own)} of megatrain modules)")
