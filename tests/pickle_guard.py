"""Finds, in Python source, every way it could unpickle freely: torch.load without weights_only=True, pickle's
load/loads/Unpickler, numpy's allow_pickle=True. The source is parsed (ast), and each name is followed back to what
it was imported as, so `import torch as t; t.load(p)`, `from torch import load as L` or `from pickle import loads`
are seen for what they are. Only a literal `weights_only=True` in the call itself counts: torch.load passed around as
a value (`f = torch.load`) cannot be checked, so it is reported too.

Out of reach, and not used in megatrain: names built at run time (importlib.import_module("pickle"), eval).
"""
import ast

# torch's loaders: allowed only when called with weights_only=True
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
# never allowed: the standard pickle module, its C accelerator and the usual drop-ins
PICKLE_LOADS = {f"{module}.{name}" for module in ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
                for name in ("load", "loads", "Unpickler", "_load", "_loads", "_Unpickler")}


def _imported_names(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it was imported as, from every import in the file (those inside functions too).
    Relative imports (megatrain's own modules) are left out."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:  # import torch.serialization as s: s is torch.serialization
                    names[a.asname] = a.name
                else:  # import torch.serialization: binds torch
                    top = a.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                if a.name != "*":
                    names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, names: dict[str, str]) -> str | None:
    """What an expression names, as an imported dotted name (torch.load), or None: a local name, a call result."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, names)
        return f"{base}.{node.attr}" if base else None
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
        base = _dotted(node.args[0], names)  # getattr(torch, "load")
        return f"{base}.{node.args[1].value}" if base else None
    return None


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unpickling_calls(source: str, filename: str = "<source>") -> list[str]:
    """'file:line: what' for every free unpickling in `source`; [] when there is none."""
    tree = ast.parse(source, filename)
    names = _imported_names(tree)
    found, checked = [], set()  # checked: the ids of torch.load references called with weights_only=True
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        if _dotted(node.func, names) in TORCH_LOADS and _is_true(keywords.get("weights_only")):
            checked.add(id(node.func))
        if "weights_only" in keywords and not _is_true(keywords["weights_only"]):
            found.append(f"{filename}:{node.lineno}: weights_only={ast.unparse(keywords['weights_only'])}")
        if _is_true(keywords.get("allow_pickle")):
            found.append(f"{filename}:{node.lineno}: allow_pickle=True")
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Name, ast.Attribute, ast.Call)) or id(node) in checked:
            continue
        name = _dotted(node, names)
        if name in PICKLE_LOADS:
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)} ({name})")
        elif name in TORCH_LOADS:
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)} ({name}) without weights_only=True")
    return found
