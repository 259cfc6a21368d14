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
