"""Check the built distributions (``make dist``): one wheel and one sdist per package of the workspace, each
at the core's version (``msgbus.__version__``), which CHANGELOG.md has an entry for, and adapters that
accept that core version. Exit status 1 with what is wrong."""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def problems(dist_dir: Path) -> list[str]:
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    version = re.search(r'^__version__ = "([^"]+)"', (ROOT / "msgbus/__init__.py").read_text(), re.M)
    found: list[str] = []
    if version is None or version.group(1) != core["version"]:
        found.append(f"msgbus.__version__ does not match pyproject.toml's version {core['version']}")
    if f"## [{core['version']}]" not in (ROOT / "CHANGELOG.md").read_text():
        found.append(f"CHANGELOG.md has no entry '## [{core['version']}]'")
    adapters = sorted(ROOT.glob("adapters/*/pyproject.toml"))
    projects = [core] + [tomllib.loads(p.read_text())["project"] for p in adapters]
    for project in projects:
        stem = f"{project['name'].replace('-', '_')}-{project['version']}"
        if project["version"] != core["version"]:
            found.append(f"{project['name']} is at {project['version']}, the core at {core['version']}")
        wheels = list(dist_dir.glob(f"{stem}-*.whl"))
        if len(wheels) != 1:
            found.append(f"{project['name']}: expected one wheel {stem}-*.whl, found {len(wheels)}")
        if not (dist_dir / f"{stem}.tar.gz").exists():
            found.append(f"{project['name']}: no sdist {stem}.tar.gz")
        for dep in project.get("dependencies", []):
            req = Requirement(dep)
            if req.name == "msgbus" and not req.specifier.contains(core["version"]):
                found.append(f"{project['name']} requires {dep}, which excludes the core {core['version']}")
        if project is core and wheels:
            names = set(zipfile.ZipFile(wheels[0]).namelist())
            for needed in ("msgbus/py.typed", "msgbus/testing/plugin.py"):
                if needed not in names:
                    found.append(f"the msgbus wheel lacks {needed}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dist_dir", type=Path)
    found = problems(parser.parse_args().dist_dir)
    for line in found:
        print(f"check_release: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
