"""One version number: quantdream.__version__, pyproject.toml, CHANGELOG.md's newest entry and `quantdream --version`."""
import re
import tomllib
from pathlib import Path

import pytest

import quantdream
from quantdream.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_one_number_everywhere():
    assert re.fullmatch(r"\d+\.\d+\.\d+", quantdream.__version__)
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == quantdream.__version__
    newest = re.search(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.M).group(1)
    assert newest == quantdream.__version__


def test_cli_prints_the_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"quantdream {quantdream.__version__}"
