"""The house's layers hold: lint-imports (import-linter) keeps every contract of .importlinter."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_every_import_contract_is_kept() -> None:
    contracts = configparser.ConfigParser()
    contracts.read(REPO / ".importlinter")
    sections = [section for section in contracts.sections() if section.startswith("importlinter:contract:")]
    names = [contracts[section]["name"] for section in sections]

    result = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "COLUMNS": "1000"})  # one contract a line

    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert names and all(f"{name} KEPT" in result.stdout for name in names), result.stdout[-4000:]
