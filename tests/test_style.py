"""Project rules that a reviewer would otherwise have to remember."""
import re
import subprocess

from tests.harness import BIN, ROOT


def test_only_comm_world_imports_horovod():
    pattern = re.compile(r"^\s*(import horovod|from horovod)", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for p in [*ROOT.glob("hvdet/**/*.py"), ROOT / "train.py"]
                 if pattern.search(p.read_text()) and p != ROOT / "hvdet" / "comm" / "world.py"]
    assert offenders == []


def test_ruff_is_clean():
    subprocess.run([str(BIN / "ruff"), "check", "hvdet", "tests", "benchmarks", "launch", "train.py"],
                   cwd=ROOT, check=True)


# The pipeline's layers, bottom up: a module may import its own layer's modules and those below,
# never one above (a module's layer is that of its longest listed prefix).
LAYERS = [
    ("hvdet.exit_codes", "hvdet.errors", "hvdet.atomic", "hvdet.registry", "hvdet.dataclass_yaml", "hvdet.recipe_base",
     "hvdet.config_checks", "hvdet.config", "hvdet.tensorboard_log", "hvdet.wandb_log", "hvdet.mlflow_log",
     "hvdet.timemodel", "hvdet.scoring"),
    ("hvdet.comm",),
    ("hvdet.ops",),
    ("hvdet.nn", "hvdet.optim", "hvdet.data", "hvdet.data.synthetic_hard"),
    ("hvdet.models", "hvdet.plan", "hvdet.runlog", "hvdet.eval.coco", "hvdet.checkpoint", "hvdet.step",
     "hvdet.preempt", "hvdet.mlperf", "hvdet.finetune"),
    ("hvdet.run", "hvdet.builders", "hvdet.report", "hvdet.eval.background"),
    ("hvdet.eval.results", "hvdet.eval.evaluators", "hvdet.predict"),
    ("hvdet.engine",),
    ("hvdet.cli", "hvdet"),
]


def _module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Each hvdet module's hvdet imports, at module level and inside functions alike."""
    import ast
    modules = {_module_name(p): p for p in ROOT.glob("hvdet/**/*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("hvdet")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
                if base.startswith("hvdet"):  # `from hvdet.comm import world` imports the module hvdet.comm.world
                    found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = found - {name}
    return graph


def _layer(module: str) -> int:
    matches = [(len(prefix), i) for i, layer in enumerate(LAYERS) for prefix in layer
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer of tests/test_style.py: LAYERS (add it where it belongs)"
    return max(matches)[1]


def test_nothing_imports_upward_and_the_import_graph_is_acyclic():
    graph = _imports()
    upward = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
              for m, deps in graph.items() for d in deps if _layer(d) > _layer(m)]
    assert upward == []
    # A depth-first search for a cycle; packages count as the modules their __init__ imports.
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(d):], d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_modules_stay_small_or_say_why():
    """Files under about 300 lines (DESIGN.md's style); a longer one states its reason at its top."""
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in ROOT.glob("hvdet/**/*.py")
            if (n := len(p.read_text().splitlines())) > 320
            and "Longer than 300 lines because" not in p.read_text()[:3000]]
    assert long == []


def test_registries_resolve_and_config_offers_exactly_their_names():
    """Every name a recipe may choose imports to a real implementation, and config's allowed values
    are the registries' names (one source, so they cannot drift apart)."""
    from hvdet import config, registry

    for table in (registry.NORMS, registry.OPTIMIZERS, registry.GROUP_BACKENDS, registry.DATASETS):
        for name in table:
            assert callable(table.load(name)), f"{table.key}: {name} -> {table[name]}"
    for name in registry.FAMILIES:  # hvdet.models.family.Family: a builder and a module map
        family = registry.FAMILIES.load(name)
        assert callable(family.build) and family.modules.order, f"model family: {name}"
    for key, table in (("model.arch", registry.ARCHS), ("model.norm", registry.NORMS),
                       ("solver.optimizer", registry.OPTIMIZERS), ("data.format", registry.DATASETS)):
        assert config.CHOICES[key] == tuple(table)
    assert config.CHOICES["bn.backend"] == ("auto", *registry.GROUP_BACKENDS)
    assert {a.family for a in registry.ARCHS.values()} <= set(registry.FAMILIES)
