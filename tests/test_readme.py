"""README.md stays true to the code: every config key and every stage is documented."""

import re

from pipeline.config import Config
from stages import STAGE_NAMES
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_readme_config_table_lists_every_key_of_every_section():
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+) \|$", README, flags=re.M))
    for section, field in Config.model_fields.items():
        assert section in rows, f"README config table lacks section {section}"
        documented = set(re.findall(r"`(\w+)`", rows[section]))
        keys = {f.alias or name for name, f in field.annotation.model_fields.items()}
        assert keys == documented, f"{section}: undocumented {keys - documented}, stale {documented - keys}"


def test_readme_stage_table_lists_every_stage_in_order():
    stages = re.findall(r"^\| `(\w+)` \| [^|]+ \| [^|]+ \| [^|]+ \|$", README, flags=re.M)
    assert tuple(stages) == STAGE_NAMES


def layout_rows() -> dict[str, str]:
    section = README[README.index("### Layout"):]
    return dict(re.findall(r"^\| `([\w/]+/)` \| (.+) \|$", section, flags=re.M))


def test_readme_layout_names_every_package_and_only_modules_that_exist():
    rows = layout_rows()
    layers = ("storage_schemas", "pipeline", "stages", "flows", "srcflow")
    packages = {str(d.parent.relative_to(REPO)) + "/" for layer in layers for d in (REPO / layer).rglob("__init__.py")}
    assert packages <= set(rows), f"README layout lacks {packages - set(rows)}"
    for folder, text in rows.items():
        assert (REPO / folder).is_dir(), folder
        for module in re.findall(r"`(\w+\.py)`", text):
            assert (REPO / folder / module).is_file(), f"README layout: {folder}{module} does not exist"
    listed = {folder + m for folder, text in rows.items() for m in re.findall(r"`(\w+\.py)`", text)}
    for package in packages:
        modules = {package + p.name for p in (REPO / package).glob("*.py") if p.name != "__init__.py"}
        assert modules <= listed, f"README layout lacks {sorted(modules - listed)}"
