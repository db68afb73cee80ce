"""The stages' boundaries, read from the source: who may import whom, and no import loops."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cache import CacheRoot
from pipeline.registry import Registry
from tests.conftest import KEY, build_cache

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "extract", "train")
# The recipe (and the recipes built on it) and the CLI are the only modules that drive both stages.
BOTH_STAGES_ALLOWED = {
    "pipeline/experiment.py",
    "pipeline/baselines.py",
    "pipeline/predict.py",
    "pipeline/plan.py",
}


def _modules(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports anywhere, functions included (``from a.b import c`` counts as
    ``a.b`` and ``a.b.c``); ``if TYPE_CHECKING:`` blocks are left out: they never run."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
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
    assert not _touches(_imports(path), "train"), f"{path} imports train/"


@pytest.mark.parametrize("path", _modules("train"), ids=lambda p: str(p.relative_to(ROOT)))
def test_training_never_imports_a_backbone_ray_or_the_extraction_stage(path):
    imports = _imports(path)
    for forbidden in ("extract", "transformers", "ray"):
        assert not _touches(imports, forbidden), f"{path} imports {forbidden}"


def test_only_the_recipe_and_the_cli_import_both_stages():
    both = {
        str(path.relative_to(ROOT))
        for path in _modules("pipeline")
        if _touches(_imports(path), "extract") and _touches(_imports(path), "train")
    }
    allowed = BOTH_STAGES_ALLOWED | {str(p.relative_to(ROOT)) for p in (ROOT / "pipeline").glob("cli*.py")}
    assert both <= allowed, both - allowed
    assert "pipeline/experiment.py" in both  # the rule is checked against a module that really does


def test_benchmarks_and_tests_use_the_recipe_not_the_cli():
    for path in _modules("benchmarks", "tests"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "pipeline.cli":
                names = {alias.name for alias in node.names}
                assert names <= {"main", "build_parser"}, f"{path} imports {names} from the CLI"


def test_no_import_loops():
    """The project's modules import each other without a cycle, counting imports inside functions too:
    a lazy import that points back is still a loop in the design, only hidden from Python."""
    graph = {}
    for path in _modules(*PACKAGES):
        name = _name(path)
        graph[name] = {i for i in _imports(path) if i.split(".")[0] in PACKAGES}
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
from pipeline.cli import main
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
    code = f"import sys, pipeline.cli; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
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
    """`unipt plan --sample`'s default is written in the CLI too (the planner imports torch): the same."""
    from pipeline import cli_plan, plan

    assert cli_plan.SAMPLE_EXAMPLES == plan.SAMPLE_EXAMPLES


def test_plan_and_extract_take_no_run_record_flags():
    """They write no run record: --runs-root and --registry would be accepted and ignored."""
    from pipeline.cli import build_parser

    parser = build_parser()
    for command in ("plan", "extract"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "c.yaml", "--registry", "r.sqlite"])
    assert parser.parse_args(["run", "c.yaml", "--registry", "r.sqlite"]).registry == "r.sqlite"


def test_the_config_checks_a_method_without_importing_the_methods():
    """`train.method` is checked against pipeline/method_names.py, not the registry that builds models."""
    code = (
        "import sys; from pipeline.config import TrainConfig; TrainConfig(method='lst'); "
        f"print(sorted(m for m in {HEAVY!r} + ('train',) if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.strip() == "[]"
