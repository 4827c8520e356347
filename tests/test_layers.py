"""The package's layers import downwards only (ARCHITECTURE.md), and ``import ctxext.rope`` stays torch-only.

Every import in every module counts, also those inside functions: a lazy import from a higher layer is still a
dependency on it."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ctxext"
# lowest first; a module may import its own layer and those before it
LAYERS = ["base", "rope", "models", "io", "patch", "data", "train", "evals", "longrope", "experiments", "cli"]
BASE_MODULES = {"ctxext", "ctxext.errors", "ctxext.options"}


def layer_of(module: str) -> str:
    if module in BASE_MODULES:
        return "base"
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        raise AssertionError(f"{module} belongs to no layer: add its folder to LAYERS (and ARCHITECTURE.md)")
    return parts[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import; ctxext imports absolutely")
            if node.module and node.module.split(".")[0] == "ctxext":
                found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "ctxext"]
    return found


def target_layer(name: str) -> str:
    """``ctxext.io.checkpoint.load_model`` -> ``io``; ``ctxext.__version__`` -> ``base``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "base"


MODULES = sorted(PACKAGE.rglob("*.py"))
FACADE = PACKAGE / "__init__.py"  # the package's face names the public API of every layer, loaded on first use


def graph() -> dict[str, set[str]]:
    """module -> the ctxext modules it imports (``from ctxext.io import atomic`` names the module ``atomic``)."""
    names = {module_name(p) for p in MODULES}
    edges = {}
    for path in MODULES:
        targets = set()
        for _, name in imports_of(path):
            while name not in names and "." in name:
                name = name.rsplit(".", 1)[0]
            targets.add(name)
        edges[module_name(path)] = targets - {module_name(path), "ctxext"}
    return edges


def test_every_module_belongs_to_a_layer_and_the_top_level_stays_small():
    assert {layer_of(module_name(p)) for p in MODULES} <= set(LAYERS)
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= 8, top


@pytest.mark.parametrize("path", [p for p in MODULES if p != FACADE], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_downwards_only(path):
    here = layer_of(module_name(path))
    upward = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name} ({target_layer(name)} is above {here})"
        for line, name in imports_of(path)
        if LAYERS.index(target_layer(name)) > LAYERS.index(here)
    ]
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The rule can fail: a rope module that imports the train layer, even inside a function, is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ctxext.train.loop import finetune\n")
    assert [target_layer(n) for _, n in imports_of(bad)] == ["train"]
    assert LAYERS.index("train") > LAYERS.index(layer_of("ctxext.rope.bad"))


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_rope_imports_without_transformers():
    code = "import sys, ctxext.rope, ctxext; print([m for m in ('transformers', 'ctxext.models') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_import_ctxext_registers_attention_types_once_transformers_models_load():
    code = (
        "import ctxext\n"
        "from transformers import AutoModelForCausalLM  # noqa: F401\n"
        "import transformers.modeling_utils\n"
        "from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS\n"
        "print(sorted(k for k in ROPE_INIT_FUNCTIONS if k.startswith('ctxext_')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['ctxext_selfextend', 'ctxext_xpos']"
