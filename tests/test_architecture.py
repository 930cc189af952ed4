"""The package's shape stays easy to see: no import cycles, only the CLI imports a step module, small
modules and functions, the self-contained generator, and docs that do not point outside the repository."""
import ast
from pathlib import Path

import eimctl

PACKAGE = Path(eimctl.__file__).parent
REPO = PACKAGE.parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """eimctl modules that `path` imports anywhere in its body (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in MODULES}
    return found


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def test_no_import_cycles():
    state: dict[str, int] = {}   # 1 = on the current path, 2 = done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH[name]):
            assert state.get(target) != 1, "import cycle: " + " -> ".join(path + [name, target])
            if target not in state:
                visit(target, path + [name])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [])


def test_only_the_cli_imports_step_modules():
    offenders = {name: sorted(t for t in targets if t.startswith("eimctl.steps."))
                 for name, targets in GRAPH.items() if not name.startswith("eimctl.cli")}
    assert {name: targets for name, targets in offenders.items() if targets} == {}


def test_generate_has_no_project_imports():
    assert GRAPH["eimctl.models.generate"] == set()


def test_small_modules_and_functions():
    long_files = {name: n for name, path in MODULES.items()
                  if (n := len(path.read_text(encoding="utf-8").splitlines())) > 400}
    long_functions = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1}"
                      for name, path in MODULES.items()
                      for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > 60]
    assert long_files == {} and long_functions == []


def test_the_repository_does_not_point_outside_itself():
    design, shared = "DESIGN" + ".md", "../" + "shared"
    texts = [*REPO.glob("eimctl/**/*.py"), *REPO.glob("tests/**/*.py"), *REPO.glob("docs/*.md"),
             *REPO.glob("examples/**/*"), *REPO.glob("benchmarks/*.py"), REPO / "README.md",
             REPO / "queues/README.md", REPO / "Makefile"]
    offenders = [str(p.relative_to(REPO)) for p in texts if p.is_file()
                 and (design in (text := p.read_text(encoding="utf-8", errors="replace")) or shared in text)]
    assert offenders == []
