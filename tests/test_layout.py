"""The source tree's shape: floors that import only downward, small modules, a docstring for
every package. A failing test here means the layout drifted, not that a feature broke."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"

# Each module's floor; a module may import from its own floor or below, never above. Training
# and inference share a floor and may not import each other: what both need lives below them.
FLOORS = {
    "lorakit.errors": 0,
    "lorakit.atomic": 0,
    "lorakit.heap": 0,
    "lorakit.quant.nf4": 1,
    "lorakit.quant.bnb_format": 1,
    "lorakit.kernels": 2,
    "lorakit.quant.linear": 3,
    "lorakit.quant.experts": 3,
    "lorakit.lora": 4,
    "lorakit.models": 5,
    "lorakit.training": 6,
    "lorakit.inference": 6,
    "lorakit.server": 7,
    "lorakit.cli": 8,
    "lorakit": 8,  # the package's __init__: the public API, on top
}
SIBLINGS = {("lorakit.training", "lorakit.inference"), ("lorakit.inference", "lorakit.training")}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _group(module: str) -> str:
    """The key of FLOORS that `module` belongs to (the longest prefix)."""
    keys = [k for k in FLOORS if module == k or module.startswith(k + ".")]
    assert keys, f"{module} has no floor in tests/test_layout.py: give it one"
    return max(keys, key=len)


def _imports(path: Path) -> set[str]:
    """Every lorakit module the file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lorakit")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lorakit"):
            found.add(node.module)
            # `from lorakit.x import y` may name a submodule y: count it as lorakit.x.y
            found |= {f"{node.module}.{a.name}" for a in node.names if node.module != "lorakit"}
    return {m for m in found if m in _modules() or m.rpartition(".")[0] in _modules()}


@pytest.mark.parametrize("module", list(_modules()))
def test_imports_go_down_the_floors(module):
    if module == "lorakit":
        return  # the public API imports from every floor, by design
    mine = _group(module)
    for imported in _imports(_modules()[module]):
        if imported not in _modules():
            imported = imported.rpartition(".")[0]
        theirs = _group(imported)
        assert FLOORS[theirs] <= FLOORS[mine], f"{module} (floor {FLOORS[mine]}) imports {imported}"
        assert (mine, theirs) not in SIBLINGS, f"{module} imports its sibling floor's {imported}"


@pytest.mark.parametrize("module", list(_modules()))
def test_modules_stay_small(module):
    lines = len(_modules()[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it (budget {MAX_LINES})"


def test_every_package_says_what_it_holds():
    for init in SRC.rglob("__init__.py"):
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"


def test_every_c_kernel_sits_beside_its_python_wrapper():
    for source in (SRC / "kernels").glob("*.c"):
        assert source.with_suffix(".py").is_file(), f"{source.name} has no wrapper module"
