"""The code's layout holds (docs/architecture.md, "The package map"): no import cycle among the project's modules,
no module importing another's private names, arrows between packages one way, and the subpackages built on the
torch-free vocabulary (config, schedule, options, lora_options, errors) alone of the top-level modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("megatrain_lightning", "planner")
BASE = {"megatrain_lightning.config", "megatrain_lightning.schedule", "megatrain_lightning.options",
        "megatrain_lightning.lora_options", "megatrain_lightning.errors"}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in module `name`, in functions too."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # `from pkg import module` imports the module
                target = f"{base}.{a.name}"
                out.append((target, []) if target in MODULES else (base, [a.name]))
    return [(m, names) for m, names in out if m in MODULES and m != name]


GRAPH = {name: _imports(name) for name in MODULES}


def test_no_import_cycle():
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for target, _ in GRAPH[m]:
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])


def test_no_module_imports_another_modules_private_names():
    private = [f"{m} takes {n} from {target}" for m, edges in GRAPH.items() for target, names in edges
               for n in names if n.startswith("_")]
    assert not private, private


def _package(m: str) -> str:
    parts = m.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or MODULES[m].name == "__init__.py" else m


def test_arrows_between_packages_run_one_way():
    arrows = {(_package(m), _package(t)) for m, edges in GRAPH.items() for t, _ in edges if _package(m) != _package(t)}
    both = sorted(f"{a} <-> {b}" for a, b in arrows if (b, a) in arrows and a < b)
    assert not both, both


def test_subpackages_use_only_the_torch_free_vocabulary_of_the_top_level():
    sub = {m for m in MODULES if m.startswith("megatrain_lightning.") and m.count(".") >= 2}
    top = {m for m in MODULES if m.startswith("megatrain_lightning.") and m.count(".") == 1
           and MODULES[m].name != "__init__.py"}
    wrong = sorted(f"{m} -> {t}" for m in sub for t, _ in GRAPH[m] if t in top - BASE)
    assert not wrong, wrong
