"""The wheel carries every package of the source tree: pyproject.toml lists them by hand
(the prompts live outside the package), so a new sub-package must be added there."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_sub_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    in_tree = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "scanner_gateway").rglob("__init__.py")}
    assert in_tree <= listed, sorted(in_tree - listed)
