"""The import contract: imports run one way, no two modules import each other, no private name crosses a package.

Every module under src/istune is parsed with ``ast``; every import counts, lazy ones (inside a
function) included. A module belongs to a *unit*: its top-level package or module under
``istune`` (``istune.eval.cached`` -> ``eval``, ``istune.models`` -> ``models``; the package's
``__init__`` is the unit ``istune``). The units stand on floors::

    0  config, io, options                      (no istune imports but each other's)
    1  core
    2  adapters, data, eval, integrations, models, runs
    3  planning (the memory planner and the benchmarks' rows, model builder and measured step)
    4  analysis, bench, recipe
    5  cli, istune (the public names of __init__)
    6  __main__

A unit may import its own modules and any unit on a lower floor; on its own floor only along
an edge of ``SAME_FLOOR``; never a higher floor. ``recipe`` is a leaf: only ``cli`` imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "istune"

FLOORS = {
    "config": 0, "io": 0, "option_checks": 0, "rule_catalog": 0,
    "core": 1,
    "adapters": 2, "data": 2, "eval": 2, "integrations": 2, "models": 2, "runs": 2,
    "planning": 3,
    "analysis": 4, "bench": 4, "recipe": 4,
    "cli": 5, "istune": 5,
    "__main__": 6,
}
# Imports between units of one floor, (importer, imported); a pair in both directions would be a cycle.
SAME_FLOOR = {
    ("config", "rule_catalog"),  # the rules' declared parameters and traits, which the config checks
    ("config", "option_checks"),  # the "did you mean" of an unknown option
    ("models", "data"),     # the embedded model is converted into the data cache root
    ("eval", "data"),       # prompts, eval items and the harness' packaged splits
    ("eval", "models"),     # the result cache keys on the resolved model folder
    ("runs", "data"),       # a run's training and held-out rows
    ("runs", "eval"),       # --eval_tasks and --eval_method read as the evaluation reads them
    ("runs", "models"),     # the batch layout is tried on the loaded model
    ("analysis", "bench"),  # the analyses reuse the probes' statistics and frozen-adapter runs
}
ONLY_IMPORTED_BY = {"recipe": {"cli"}}  # a recipe is a leaf



def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """``istune.eval.cached`` -> ``eval``; the package itself -> ``istune``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "istune"


def read_imports(modules: dict[str, str]) -> dict[str, set[tuple[str, str]]]:
    """Per module (name -> source), the ``(module, name)`` pairs it imports from istune (name '' for a module)."""
    known = set(modules)
    imports: dict[str, set[tuple[str, str]]] = {}
    for importer, source in modules.items():
        found = set()
        package = importer if source.startswith("#package") else importer.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                found |= {(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "istune"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] != "istune":
                    continue
                for alias in node.names:  # `from package import submodule` imports the submodule
                    submodule = f"{base}.{alias.name}"
                    found.add((submodule, "") if submodule in known else (base, alias.name))
        imports[importer] = found
    return imports


def violations(imports: dict[str, set[tuple[str, str]]]) -> list[str]:
    """Every break of the contract in ``imports`` (see :func:`read_imports`), as readable lines."""
    found = []
    for importer, targets in sorted(imports.items()):
        for module, name in sorted(targets):
            full = f"{module}.{name}" if name else module
            edge = f"{importer} imports {full}"
            source, target = unit(importer), unit(module)
            private = [part for part in full.split(".")[1:] if part.startswith("_") and part != "__main__"]
            if private and source != target:
                found.append(f"{edge}: a private name of another package")
            if source == target:
                continue
            if target in ONLY_IMPORTED_BY and source not in ONLY_IMPORTED_BY[target]:
                found.append(f"{edge}: {target} is imported only by {', '.join(sorted(ONLY_IMPORTED_BY[target]))}")
            elif FLOORS[target] > FLOORS[source]:
                found.append(f"{edge}: floor {FLOORS[source]} imports floor {FLOORS[target]}")
            elif FLOORS[target] == FLOORS[source] and (source, target) not in SAME_FLOOR:
                found.append(f"{edge}: {source} and {target} share floor {FLOORS[source]} without a SAME_FLOOR edge")
    return found


def cycles(imports: dict[str, set[tuple[str, str]]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or around a loop (strongly connected components)."""
    graph = {importer: {module for module, _ in targets if module in imports and module != importer}
             for importer, targets in imports.items()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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


def package_imports() -> dict[str, set[tuple[str, str]]]:
    modules = {}
    for path in sorted(SOURCE.rglob("*.py")):
        text = path.read_text()
        modules[module_name(path)] = ("#package\n" if path.name == "__init__.py" else "") + text
    return read_imports(modules)


def test_every_unit_has_a_floor():
    assert {unit(module) for module in package_imports()} <= set(FLOORS)


def test_imports_run_one_way_and_no_private_name_crosses_a_package():
    imports = package_imports()
    assert violations(imports) == []


def test_no_two_modules_import_each_other():
    assert cycles(package_imports()) == []


def test_recipe_is_imported_by_the_command_line_alone():
    importers = {unit(importer) for importer, targets in package_imports().items()
                 for module, _ in targets if unit(module) == "recipe" and unit(importer) != "recipe"}
    assert importers == {"cli"}


# The checker itself, on tiny fake packages: each rule fails where it should.
def fake(sources: dict[str, str]) -> dict[str, set[tuple[str, str]]]:
    return read_imports(sources)


@pytest.mark.parametrize("sources,expected", [
    ({"istune.core.tuner": "from istune.eval.loss import heldout_loss"},
     "istune.core.tuner imports istune.eval.loss.heldout_loss: floor 1 imports floor 2"),
    ({"istune.core.tuner": "def f():\n    import istune.models\n"},  # lazy imports count
     "istune.core.tuner imports istune.models: floor 1 imports floor 2"),
    ({"istune.analysis.run": "from istune.recipe.train import train"},
     "istune.analysis.run imports istune.recipe.train.train: recipe is imported only by cli"),
    ({"istune.data.cache": "from istune.eval.tasks import parse_eval_tasks"},
     "istune.data.cache imports istune.eval.tasks.parse_eval_tasks: data and eval share floor 2 without a SAME_FLOOR "
     "edge"),
    ({"istune.runs": "from istune.core.layers import _layer_list"},
     "istune.runs imports istune.core.layers._layer_list: a private name of another package"),
    ({"istune.bench.x": "from istune.eval._modes import eval_mode"},
     "istune.bench.x imports istune.eval._modes.eval_mode: a private name of another package"),
])
def test_the_checker_finds_each_kind_of_violation(sources, expected):
    assert violations(fake(sources)) == [expected]


def test_the_checker_accepts_what_the_contract_allows():
    sources = {
        "istune.eval": "#package\nfrom .cached import evaluate_model\nfrom . import tasks\n",
        "istune.eval.cached": "from istune.eval._modes import eval_mode\nfrom istune.models import resolve_model_path",
        "istune.eval.tasks": "", "istune.eval._modes": "",
        "istune.analysis.sweep": "from istune.bench.probes import spearman\nfrom istune.io import write_text",
        "istune.cli": "def main():\n    from istune.recipe.train import train\n",
    }
    imports = fake(sources)
    assert imports["istune.eval"] == {("istune.eval.cached", "evaluate_model"), ("istune.eval.tasks", "")}
    assert violations(imports) == []


def test_the_checker_finds_modules_that_import_each_other():
    imports = fake({"istune.recipe.train": "from istune.recipe.evaluate import evaluate_base",
                    "istune.recipe.evaluate": "def f():\n    from istune.recipe.train import format_results\n",
                    "istune.recipe.plot": "from istune.recipe.train import format_results"})
    assert cycles(imports) == [["istune.recipe.evaluate", "istune.recipe.train"]]
