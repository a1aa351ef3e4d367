"""The import floors: data -> extract -> train -> evaluate's public door, with mmkd_core beneath all of them
and the apps' shared glue (mmkd.app) beside the stages. No stage imports another stage's internals,
evaluation imports no training code, and the library (mmkd_core, data) imports no app."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("data", "extract", "train", "evaluate", "ablate")
# stage -> the stages whose public package (``mmkd.<stage>``, never its modules) it may import
ALLOWED = {
    "data": set(),
    "extract": {"data"},
    "train": {"data", "evaluate"},
    "evaluate": {"data"},
    "ablate": {"data", "evaluate", "train"},
    "mmkd_core": set(),
    "app": set(),  # what the apps share imports no stage; its entry points (app/entry.py) start them
}
ENTRY_POINTS = ROOT / "app" / "entry.py"
APPS = ("extract", "train", "evaluate", "ablate")  # may import mmkd.app's modules


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
    return out


@pytest.mark.parametrize("folder", [*STAGES, "mmkd_core", "app"])
def test_no_stage_reaches_into_another(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files
    for path in files:
        if path in (ROOT / "mmkd_core" / "__init__.py", ENTRY_POINTS):
            continue  # the public API re-exports create_dataset lazily; it is the façade, not a floor
        for name in _imports(path):
            parts = name.split(".")
            assert parts[0] not in STAGES, f"{path.relative_to(ROOT)} imports bare {name!r}: use mmkd.{name}"
            if parts[0] != "mmkd" or len(parts) < 2:
                continue
            stage = parts[1]
            if stage == folder or (stage == "app" and folder in APPS):
                continue
            assert stage in ALLOWED[folder], f"{path.relative_to(ROOT)} imports {name} ({folder} must not)"
            assert len(parts) == 2, f"{path.relative_to(ROOT)} imports {name}: another stage's internals"


# ---------------------------------------------------------------- the house's shape: no cycles, short functions

PACKAGES = {"mmkd_core": "mmkd_core", "data": "mmkd.data", "extract": "mmkd.extract", "train": "mmkd.train",
            "evaluate": "mmkd.evaluate", "ablate": "mmkd.ablate", "app": "mmkd.app"}  # fmt: skip
LONGEST_FUNCTION = 60


def _module_files() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            out[name.removesuffix(".__init__")] = path
    return out


def _edges(files: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            edges[module] |= {n for n in names if n in files and n != module}
    return edges


def test_no_import_cycles_between_files():
    """A file-level import cycle (a -> b -> a) means a seam in the wrong place (a package's __init__
    re-exporting its own modules is not one)."""
    files = _module_files()
    edges = _edges(files)

    def is_reexport(a: str, b: str) -> bool:  # a package's __init__ and its own submodule
        return (files[a].name == "__init__.py" and b.startswith(a + ".")) or (
            files[b].name == "__init__.py" and a.startswith(b + ".")
        )

    for a, targets in edges.items():
        for b in targets:
            if is_reexport(a, b):
                continue
            # is there a path back from b to a (not through a package's re-exports)?
            seen, todo = {b}, [b]
            while todo:
                m = todo.pop()
                for n in edges[m]:
                    if n == a:
                        pytest.fail(f"import cycle: {a} -> {b} -> ... -> {a}")
                    if n not in seen and not is_reexport(m, n):
                        seen.add(n)
                        todo.append(n)


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in _module_files().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > LONGEST_FUNCTION:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 60 lines: " + "; ".join(long)
