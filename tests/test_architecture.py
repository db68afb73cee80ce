"""The stages' boundaries, read from the source: who may import whom, and no import loops."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import KEY, build_cache
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.runs.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "extract", "train")  # the repository's folders; they install as unipt.<folder>
# The recipe (and the recipes built on it) and the CLI are the only modules that drive both stages.
BOTH_STAGES_ALLOWED = {
    "pipeline/experiment/recipe.py",
    "pipeline/model/predict.py",
    "pipeline/experiment/forward_timing.py",
}


def _modules(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def _name(path: Path) -> str:
    """The import name: ``pipeline/cache/view.py`` -> ``unipt.pipeline.cache.view``."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return f"unipt.{name}" if parts[0] in PACKAGES else name


def _imports(path: Path, type_checking: bool = False) -> set[str]:
    """Every module ``path`` imports anywhere, functions included (``from a.b import c`` counts as
    ``a.b`` and ``a.b.c``); ``if TYPE_CHECKING:`` blocks only with ``type_checking`` (they never run)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if not type_checking and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _touches(imports: set[str], package: str) -> bool:
    return any(name == package or name.startswith(f"{package}.") for name in imports)


@pytest.mark.parametrize("path", _modules("extract"), ids=lambda p: str(p.relative_to(ROOT)))
def test_extraction_never_imports_training(path):
    assert not _touches(_imports(path), "unipt.train"), f"{path} imports train/"


@pytest.mark.parametrize("path", _modules("train"), ids=lambda p: str(p.relative_to(ROOT)))
def test_training_never_imports_a_backbone_ray_or_the_extraction_stage(path):
    imports = _imports(path)
    for forbidden in ("unipt.extract", "transformers", "ray"):
        assert not _touches(imports, forbidden), f"{path} imports {forbidden}"


def test_only_the_recipe_and_the_cli_import_both_stages():
    both = {
        str(path.relative_to(ROOT))
        for path in _modules("pipeline")
        if _touches(_imports(path), "unipt.extract") and _touches(_imports(path), "unipt.train")
    }
    allowed = BOTH_STAGES_ALLOWED | {
        str(p.relative_to(ROOT)) for p in (ROOT / "pipeline" / "cli").glob("*.py")
    }
    assert both <= allowed, both - allowed
    # The rule is checked against modules that really do (the recipe's own steps each drive one stage).
    assert both & BOTH_STAGES_ALLOWED


def test_benchmarks_and_tests_use_the_recipe_not_the_cli():
    for path in _modules("benchmarks", "tests"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "unipt.pipeline.cli.app":
                names = {alias.name for alias in node.names}
                assert names <= {"main", "build_parser"}, f"{path} imports {names} from the CLI"


def test_no_import_loops():
    """The project's modules import each other without a cycle, counting imports inside functions and
    under ``TYPE_CHECKING`` too: a lazy import that points back is still a loop in the design, only hidden
    from Python."""
    graph = {}
    for path in _modules(*PACKAGES):
        name = _name(path)
        graph[name] = {i for i in _imports(path, type_checking=True) if i.startswith("unipt.")}
    known = set(graph)
    graph = {name: {i for i in edges if i in known and i != name} for name, edges in graph.items()}

    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import loop: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


# ------------------------------------------------------------------------------------ the CLI's start-up

# What a command may import only if it uses it: each costs seconds (torch) or a third of one (zarr).
HEAVY = ("torch", "ray", "transformers", "zarr")

# Run in a fresh interpreter: `main(argv)`, then which of HEAVY are loaded, written to a file (the command's
# own output stays on stdout/stderr).
_PROBE = """
import json, sys
from unipt.pipeline.cli.app import main
try:
    main(sys.argv[2:])
except SystemExit:
    pass
json.dump(sorted(m for m in HEAVY if m in sys.modules), open(sys.argv[1], "w"))
"""


def _loaded_by(argv: list[str], folder: Path) -> set[str]:
    probe = folder / "loaded.json"
    code = f"HEAVY = {HEAVY!r}\n{_PROBE}"
    done = subprocess.run(
        [sys.executable, "-c", code, str(probe), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=folder,
    )
    assert probe.exists(), done.stderr[-3000:]
    return set(json.loads(probe.read_text()))


def test_importing_the_cli_loads_no_heavy_library():
    code = f"import sys, unipt.pipeline.cli.app; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def admin_roots(tmp_path_factory) -> Path:
    """A committed cache, an empty run registry and an empty runs root: what the light commands read."""
    root = tmp_path_factory.mktemp("cli_start")
    build_cache(CacheRoot(root / "cache"), [3, 5, 2], {0: 8})
    with Registry(root / "registry.sqlite"):
        pass
    (root / "runs").mkdir()
    return root


# Each command and what it may load: the cache commands open a Zarr store, `export` reads the weights with
# safetensors' torch loader; none of them needs Ray or transformers.
LIGHT_COMMANDS = {
    "help": (["--help"], set()),
    "plan --help": (["plan", "--help"], set()),
    "runs ls": (["runs", "ls", "--json", "--registry", "{root}/registry.sqlite"], set()),
    "runs ls, no registry": (["runs", "ls", "--json", "--registry", "{root}/none.sqlite"], set()),
    "runs show": (["runs", "show", "abc", "--registry", "{root}/registry.sqlite"], set()),
    "runs diff": (["runs", "diff", "abc", "abd", "--registry", "{root}/registry.sqlite"], set()),
    "cache ls": (["cache", "ls", "--json", "--cache-root", "{root}/cache"], {"zarr"}),
    "cache info": (["cache", "info", KEY, "--cache-root", "{root}/cache"], {"zarr"}),
    "cache verify": (["cache", "verify", KEY, "--cache-root", "{root}/cache", "--no-progress"], {"zarr"}),
    "cache gc": (
        ["cache", "gc", "--cache-root", "{root}/cache", "--runs-root", "{root}/runs"]
        + ["--registry", "{root}/registry.sqlite"],
        {"zarr"},
    ),
    "export": (["export", "{root}/runs", "--out", "{root}/exported"], {"torch"}),
}


@pytest.mark.parametrize("name", LIGHT_COMMANDS)
def test_light_commands_load_only_what_they_use(name, admin_roots):
    argv, allowed = LIGHT_COMMANDS[name]
    loaded = _loaded_by([arg.format(root=admin_roots) for arg in argv], admin_roots)
    assert loaded <= allowed, f"unipt {name} loads {sorted(loaded - allowed)}"


def test_the_cli_states_the_planners_sample_size():
    """`unipt plan --sample`'s default is the planner's own, the one the help text states."""
    import inspect

    from unipt.pipeline.cli.app import build_parser
    from unipt.pipeline.experiment import plan

    planned = inspect.signature(plan.plan).parameters["sample"].default
    assert build_parser().parse_args(["plan", "c.yaml"]).sample == planned


def test_plan_and_extract_take_no_run_record_flags():
    """They write no run record: --runs-root and --registry would be accepted and ignored."""
    from unipt.pipeline.cli.app import build_parser

    parser = build_parser()
    for command in ("plan", "extract"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "c.yaml", "--registry", "r.sqlite"])
    assert parser.parse_args(["run", "c.yaml", "--registry", "r.sqlite"]).registry == "r.sqlite"


def test_the_config_checks_a_method_without_importing_the_methods():
    """`train.method` is checked against pipeline/method_names.py, not the registry that builds models."""
    code = (
        "import sys; from unipt.pipeline.config import TrainConfig; TrainConfig(method='lst'); "
        f"print(sorted(m for m in {HEAVY!r} + ('unipt.train',) if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------ the house's layout

# Each part of the house imports only the parts before it in this order (a module of a part may import
# its own part): the core, the data, the cache format, the two stages, runs, the tuned model, the recipe,
# the CLI. The core is pipeline/'s flat modules.
LAYERS = (
    "unipt._lazy",
    "unipt.pipeline",  # the core: config, errors, log, hashing, storage, extras, tasks, ...
    "unipt.pipeline.data",
    "unipt.pipeline.cache",
    "unipt.extract",
    "unipt.train",
    "unipt.pipeline.runs",
    "unipt.pipeline.model",
    "unipt.pipeline.experiment",
    "unipt.pipeline.cli",
    "unipt",
)
SUBPACKAGES = ("cache", "data", "runs", "model", "cli", "experiment")


def _layer(name: str) -> int:
    """Index in LAYERS of the part ``name`` belongs to: its longest prefix there."""
    parts = name.split(".")
    for size in range(len(parts), 0, -1):
        prefix = ".".join(parts[:size])
        if prefix in LAYERS:
            return LAYERS.index(prefix)
    raise AssertionError(f"{name} belongs to no part of the house")


@pytest.mark.parametrize("path", _modules(*PACKAGES, "unipt"), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_part_imports_only_the_parts_before_it(path):
    name = _name(path)
    mine = _layer(name)
    for imported in _imports(path, type_checking=True):
        if imported.startswith("unipt.") and imported in _KNOWN:
            assert _layer(imported) <= mine, f"{name} ({LAYERS[mine]}) imports {imported}, a later part"


_KNOWN = {_name(p) for p in _modules(*PACKAGES)} | {"unipt._lazy"}


def test_the_layers_rule_is_checked_against_real_imports():
    recipe = set().union(*(_imports(p) for p in (ROOT / "pipeline" / "experiment").glob("*.py")))
    assert {_layer(i) for i in recipe if i in _KNOWN} >= {1, 2, 3, 4, 5, 6, 7}


@pytest.mark.parametrize(
    "path", _modules(*PACKAGES, "unipt", "benchmarks", "tests"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_nothing_imports_the_stages_by_their_bare_names(path):
    """``import train`` would find a user's train.py first; every import goes through ``unipt.``."""
    bare = {i for i in _imports(path, type_checking=True) if i.split(".")[0] in PACKAGES}
    assert not bare, f"{path} imports {sorted(bare)}: import unipt.<stage> instead"


MAX_MODULE_LINES = 450  # a module longer than this holds more than one job: split it by job


def test_modules_stay_short_and_pipeline_keeps_few_flat_modules():
    flat = sorted(p.name for p in (ROOT / "pipeline").glob("*.py"))
    assert len(flat) <= 10, f"pipeline/ holds {len(flat)} flat modules: {flat}; put them in a subpackage"
    for path in _modules(*PACKAGES):
        where = str(path.relative_to(ROOT))
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_MODULE_LINES, f"{where} has {lines} lines"


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_each_subpackage_states_its_public_surface(package):
    """Every name its ``__init__`` lists is found in the module it names, lazily (no module is imported
    before a name is used), and no name is also a submodule's (``from p import x`` would be ambiguous)."""
    code = (
        "import importlib, sys, json\n"
        f"p = importlib.import_module('unipt.pipeline.{package}')\n"
        "before = sorted(m for m in sys.modules if m.startswith(p.__name__ + '.'))\n"
        "missing = [n for n in p.__all__ if getattr(p, n, None) is None]\n"
        "print(json.dumps([before, missing, p._SURFACE]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    before, missing, surface = json.loads(done.stdout)
    assert before == [] and missing == [] and len(surface) >= 3
    submodules = {p.stem for p in (ROOT / "pipeline" / package).glob("*.py")}
    assert not set(surface) & submodules


MAX_FUNCTION_LINES = 60
SHORT_FUNCTION_FOLDERS = ("pipeline/experiment", "pipeline/cache", "extract", "train")


@pytest.mark.parametrize("folder", SHORT_FUNCTION_FOLDERS)
def test_the_recipe_the_cache_and_the_stages_have_no_long_function(folder):
    """A function you can read in one screen: longer ones are split into named steps."""
    long = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
