"""The import floors: data -> extract -> train -> evaluate's public door, with mmkd_core beneath all of them
and the apps' shared glue (mmkd.app) beside the stages. No stage imports another stage's internals,
evaluation imports no training code, and the library (mmkd_core, data) imports no app."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("data", "extract", "train", "evaluate")
# stage -> the stages whose public package (``mmkd.<stage>``, never its modules) it may import
ALLOWED = {"data": set(), "extract": {"data"}, "train": {"data", "evaluate"}, "evaluate": {"data"}, "mmkd_core": set()}
APPS = ("extract", "train", "evaluate")  # may import mmkd.app's modules
# SHIM: remove at integration (old homes of mmkd.app.cli and mmkd.app.progress)
SHIMS = {ROOT / "mmkd_core" / "cli_utils.py", ROOT / "mmkd_core" / "progress.py"}


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
    return out


@pytest.mark.parametrize("folder", [*STAGES, "mmkd_core"])
def test_no_stage_reaches_into_another(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files
    for path in files:
        if path == ROOT / "mmkd_core" / "__init__.py" or path in SHIMS:
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
