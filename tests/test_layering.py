"""Imports point down: storage_schemas <- pipeline <- stages <- flows <- srcflow (the CLI).

Every import in the tree is read from the source (module level and inside functions alike), so an arrow
pointing up fails here before it becomes a cycle or drags the application into the core library.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

LAYERS = ("storage_schemas", "pipeline", "stages", "flows", "srcflow")
# pipeline/models is the paper's math: no storage, orchestration or process groups
MODELS_MAY_NOT_IMPORT = ("zarr", "prefect", "prefect_dask", "dask", "webdataset", "torch.distributed",
                         "pipeline.artifacts", "pipeline.data", "pipeline.training", "pipeline.distributed",
                         "pipeline.parallel")
# data readers, writers and metrics sit under the training code that uses them
DATA_MAY_NOT_IMPORT = ("prefect", "prefect_dask", "pipeline.training", "pipeline.distributed")


def imports_of(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's own package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((node.lineno, module))
    return found


def module_files() -> list[tuple[Path, str]]:
    files = []
    for layer in LAYERS:
        for path in sorted((REPO / layer).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            package = ".".join(parts[:-1])  # a package's __init__ is in the package itself
            files.append((path, package or layer))
    return files


def arrows_in(path: Path, package: str) -> list[str]:
    """The imports of one file that point to a layer above its own."""
    own = LAYERS.index(package.split(".")[0])
    return [f"{path.name}:{line} imports {module} ({module.split('.')[0]} is above {LAYERS[own]})"
            for line, module in imports_of(path, package)
            if module.split(".")[0] in LAYERS and LAYERS.index(module.split(".")[0]) > own]


def test_no_import_points_up():
    files = module_files()
    assert len(files) > 50 and {p.split(".")[0] for _, p in files} == set(LAYERS)
    assert [a for path, package in files for a in arrows_in(path, package)] == []


def forbidden_imports(packages: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(REPO)}:{line} imports {module}"
            for path, package in module_files() if package.startswith(packages)
            for line, module in imports_of(path, package)
            if any(module == m or module.startswith(m + ".") for m in forbidden)]


def test_the_models_know_nothing_of_storage_orchestration_or_process_groups():
    assert forbidden_imports(("pipeline.models",), MODELS_MAY_NOT_IMPORT) == []


def test_data_and_metrics_import_no_training_code():
    assert forbidden_imports(("pipeline.data", "pipeline.metrics"), DATA_MAY_NOT_IMPORT) == []


@pytest.mark.parametrize("source, where, expected", [
    ("from stages.runner import plan\n", "pipeline/x.py", "imports stages.runner"),
    ("def f():\n    import flows.full\n", "stages/x.py", "imports flows.full"),
    ("from ..cli import app\n", "flows/sub/x.py", None),  # flows.cli: not a layer above
    ("from srcflow.cli import app\n", "flows/x.py", "imports srcflow.cli"),
    ("from pipeline.config import Config\n", "stages/x.py", None),
])
def test_the_check_catches_an_upward_import_wherever_it_is_written(tmp_path, source, where, expected):
    fake = tmp_path / where
    fake.parent.mkdir(parents=True)
    fake.write_text(source)
    found = arrows_in(fake, ".".join(Path(where).with_suffix("").parts[:-1]))
    assert (found == []) if expected is None else (len(found) == 1 and expected in found[0])
