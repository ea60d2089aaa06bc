"""The code base stays ruff-clean (lint rules in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    proc = subprocess.run([ruff, "check", "--output-format", "concise", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_package_is_listed_in_setup_cfg():
    """A wheel ships only the packages setup.cfg lists: a new subpackage left out breaks non-editable installs."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = {line.strip() for line in config["options"]["packages"].splitlines() if line.strip()}
    mapped = {k.strip(): v.strip() for k, v in (line.split("=") for line in config["options"]["package_dir"].splitlines() if "=" in line)}
    for base, folder in (("onnxopt", ROOT / "onnxopt"), ("onnxopt.passes", ROOT / "passes")):
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            name = ".".join((base, *parts))
            assert name in listed, f"{name} ({init.parent}) is missing from [options] packages in setup.cfg"
            assert name in mapped, f"{name} is missing from [options] package_dir in setup.cfg"
