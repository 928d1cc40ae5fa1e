"""What a newcomer meets first: the Makefile's set-up (run with fake tools) and the README's first steps."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="no make")


def fake_tools(folder: Path, **scripts: str) -> Path:
    """A PATH of shell scripts only: `name` runs `scripts[name]`."""
    folder.mkdir()
    for name, body in scripts.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return folder


def make(target: str, path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MAKE, "--no-print-directory", "-f", str(REPO / "Makefile"), target, *args], cwd=REPO,
                          env={"PATH": str(path)}, capture_output=True, text=True, timeout=60)


def test_without_root_or_sudo_the_browser_step_says_so_and_lets_the_tests_run(tmp_path):
    calls = tmp_path / "calls"
    path = fake_tools(tmp_path / "bin", id="echo 1000", sudo="exit 1", **{"apt-get": f'echo "$@" >> {calls}'},
                      mktemp=f"echo {tmp_path}/log")
    done = make("browser", path)
    assert done.returncode == 0 and "needs root or sudo" in done.stdout and "skipped" in done.stdout
    assert not calls.exists()
    as_root = make("browser", fake_tools(tmp_path / "root-bin", id="echo 0", **{"apt-get": f'echo "$@" >> {calls}'},
                                         mktemp=f"echo {tmp_path}/log"))
    assert as_root.returncode == 0, as_root.stderr
    assert calls.read_text().splitlines() == ["update -qq", "install -y -qq chromium"]


def test_set_up_installs_quietly():
    """pip's warnings on this kind of machine are about its own config ("Location ... is ignored"): -qq."""
    planned = make("demo", Path("/usr/bin:/bin"), "-n", "VENV=/nonexistent/venv").stdout
    installs = [line for line in planned.splitlines() if "pip install" in line]
    assert len(installs) == 3 and all(" -qq " in line for line in installs), installs
    assert "dagster_project.demo" in planned       # the demo's nights go through Dagster


def test_readme_first_steps():
    readme = (REPO / "README.md").read_text()
    assert ".venv/bin/lorafleet" in readme and "source .venv/bin/activate" in readme   # not `command not found`
    assert not re.search(r"report demo_data --date \d{4}-", readme)   # the demo's nights move with the calendar
    assert re.search(r"root \(or `sudo`", readme)                     # what `make test`'s apt-get needs
