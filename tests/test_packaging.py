"""The package as pip builds it: every gateway file is in the wheel, without setuptools warnings.

`pyproject.toml` lists packages explicitly (operator/ installs as
`herald_operator`), so a new folder under gateway/ that nobody lists would be
missing from every install but present in the editable checkout the tests use.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_holds_every_gateway_file_and_builds_without_warnings(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    output = build.stdout + build.stderr
    assert "is absent from the `packages` configuration" not in output
    assert "would be ignored" not in output
    (wheel,) = tmp_path.glob("herald-*.whl")
    members = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(
        ["git", "ls-files", "gateway", "operator"], cwd=ROOT, capture_output=True, text=True,
        check=True,
    ).stdout.split()
    expected = {
        path.replace("operator/", "herald_operator/", 1) for path in tracked
        if not path.endswith((".md", ".pyc"))
    }
    assert expected and expected <= members, sorted(expected - members)
