"""The import graph of ``src/leanvit``: no circle, and imports point down the layer order below.

Every module is parsed with ``ast`` (no import is run), function-level imports included, so a
lazy ``from .x import y`` inside a function counts like one at the top.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "leanvit"

# Bottom to top. A module may import from its own layer or those below it; "methods" stands for
# the package and every module in it.
LAYERS: List[List[str]] = [
    ["tokens", "flops", "elastic", "rl", "data", "archs", "zoo", "options", "device", "support", "convert"],  # no leanvit imports above
    ["models", "provenance"],  # model loading; what a result was computed from
    ["methods"],  # the reduction methods
    ["packing", "runtime", "adapters"],  # packed execution; the block runner and adapt; transformers / open_clip models through it
    ["measure"],  # MACs of what a runner ran
    ["evaluate", "bench", "report", "token_maps", "analysis", "export", "objects"],
    ["demo", "training", "ppo", "train_policy", "train_prance", "train"],
    ["outputs", "commands", "cli", "__main__"],  # what they may write; what the commands do; their parser
    ["__init__"],  # the package face: nothing below imports it
]
MAX_UPWARD = 0


def module_names(root: Path) -> Dict[str, Path]:
    """Dotted names relative to the package ("runtime", "methods.ppt", "methods", "__init__")."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _package_of(name: str, path: Path) -> List[str]:
    """The package a module's relative imports start from, as parts ([] for the top package)."""
    if name == "__init__":
        return []
    parts = name.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def imports_of(name: str, path: Path, modules: Set[str], top: str) -> Set[str]:
    """The package's modules that ``name`` imports anywhere in its file."""
    found = set()

    def add(parts: List[str]) -> None:
        # the longest prefix that is a module; the bare package is its __init__
        for n in range(len(parts), 0, -1):
            dotted = ".".join(parts[:n])
            if dotted in modules:
                found.add(dotted)
                return
        found.add("__init__")

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == top:
                    add(parts[1:])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(name, path)
                base = base[:len(base) - (node.level - 1)]
            elif node.module and node.module.split(".")[0] == top:
                base = []
            else:
                continue
            mod = base + (node.module.split(".")[int(not node.level):] if node.module else [])
            for alias in node.names:  # "from . import archs" names a module; "from .x import f" a name
                add(mod + [alias.name] if ".".join(mod + [alias.name]) in modules else mod)
    found.discard(name)
    return found


def import_graph(root: Path = PACKAGE) -> Dict[str, Set[str]]:
    mods = module_names(root)
    return {name: imports_of(name, path, set(mods), root.name) for name, path in mods.items()}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(name: str, layers: List[List[str]] = LAYERS) -> int:
    for i, layer in enumerate(layers):
        if name in layer or name.split(".")[0] in layer:
            return i
    raise KeyError(name)


def upward(graph: Dict[str, Set[str]], layers: List[List[str]] = LAYERS) -> List[Tuple[str, str]]:
    return sorted((a, b) for a, deps in graph.items() for b in deps if layer_of(a, layers) < layer_of(b, layers))


# --- the package ----------------------------------------------------------------------------------
def test_every_module_has_one_layer():
    graph = import_graph()
    missing = [m for m in graph if not any(m in l or m.split(".")[0] in l for l in LAYERS)]
    assert not missing, f"place these modules in LAYERS: {missing}"
    named = [n for layer in LAYERS for n in layer]
    assert len(named) == len(set(named)), "a module is in two layers"
    assert not set(named) - {m.split(".")[0] for m in graph}, "LAYERS names a module that does not exist"


def test_no_import_circle():
    found = cycles(import_graph())
    assert not found, f"import circles: {found}"


def test_imports_point_down():
    up = upward(import_graph())
    assert len(up) <= MAX_UPWARD, f"{len(up)} imports point up the layers: {up}"


# --- the checks themselves catch what they are for --------------------------------------------------
def _package(tmp_path: Path, files: Dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_checks_see_function_level_and_package_imports(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "from .top import run\n",
        "low.py": "def f():\n    from . import top\n    from pkg.sub import leaf\n",  # lazy, upward
        "top.py": "from .low import f\nimport pkg\n",
        "sub/__init__.py": "",
        "sub/leaf.py": "from .. import low\nfrom ..top import run\n",
    })
    graph = import_graph(root)
    assert graph["low"] == {"top", "sub.leaf"}
    assert graph["top"] == {"low", "__init__"}
    assert graph["sub.leaf"] == {"low", "top"}
    assert graph["__init__"] == {"top"}
    assert cycles(graph) == [["__init__", "low", "sub.leaf", "top"]]
    layers = [["low"], ["sub"], ["top"], ["__init__"]]
    assert upward(graph, layers) == [("low", "sub.leaf"), ("low", "top"), ("sub.leaf", "top"), ("top", "__init__")]
