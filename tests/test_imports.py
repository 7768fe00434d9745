"""The package's layering, read from its module-level imports: no circle, no command importing another command's
folder, no shared layer importing a command. Breaking one of these is how a codebase starts to knot. And what a
command's start imports: nothing slow that it does not use."""

import ast
import subprocess
import sys
from pathlib import Path

import emfm

PACKAGE = Path(emfm.__file__).parent
COMMANDS = ("pretrain", "finetune", "predict", "explore", "evaluation", "compare")   # one folder per command
ON_TOP = ("emfm.cli", "emfm.run", "emfm.__main__")          # the composition root may import every command


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The emfm modules ``path`` imports at module level (``from emfm.x import y`` counts as emfm.x, or as emfm.x.y
    when that is a module itself)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == "emfm")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("emfm"):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py") if "configs" not in p.parts}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def command(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in COMMANDS else None


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or None."""
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_walk_sees_the_imports_it_must_judge() -> None:
    edges = graph()
    assert "emfm.errors" in edges["emfm.data.volume"]            # a plain module-level import is found
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_emfm() -> None:
    assert cycle(graph()) is None


def test_no_command_imports_another_commands_folder() -> None:
    crossing = [f"{a} -> {b}" for a, deps in graph().items() for b in deps
                if command(a) and command(b) and command(a) != command(b)]
    assert not crossing


def test_shared_layers_import_no_command() -> None:
    upward = [f"{a} -> {b}" for a, deps in graph().items() for b in deps
              if a not in ON_TOP and not command(a) and command(b)]
    assert not upward


def test_predict_starts_without_networkx() -> None:
    """skimage's graphs (only the affinity agglomeration of emfm.instances uses them) bring networkx: 0.15-0.2 s
    of every `emfm predict` and `emfm evaluate` start, imported at module level until 2026-12-07."""
    code = "import sys, emfm.predict.predict; print('networkx' in sys.modules)"
    started = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert started.stdout.strip() == "False"
