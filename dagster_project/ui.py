"""`make ui`: `dagster dev -m dagster_project` on an instance whose `gpu` pool runs one engine at a time.

    python -m dagster_project.ui [dagster dev options, e.g. -p 3000 -h 0.0.0.0]

DAGSTER_HOME defaults to .dagster_home/ in the repo (where `make demo` materializes its nights); dagster.yaml
(the pool config) is written there when the folder has none. LORAFLEET_* env vars choose the data (see
resources.py); none: the demo's.
"""
import os
import shutil
import sys
from pathlib import Path

INSTANCE_CONFIG = Path(__file__).with_name("dagster.yaml")
REPO = Path(__file__).resolve().parents[1]


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or REPO / ".dagster_home").resolve()


def prepare_home(home: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copyfile(INSTANCE_CONFIG, home / "dagster.yaml")
    return home


def main(argv: list[str]) -> None:
    home = prepare_home(dagster_home())
    os.environ["DAGSTER_HOME"] = str(home)
    os.chdir(REPO)
    os.execv(sys.executable, [sys.executable, "-m", "dagster", "dev", "-m", "dagster_project", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
