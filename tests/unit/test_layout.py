"""The repo layout guards: `platform/` is a source folder, never a package shadowing the standard library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_platform_folder_has_no_init_file():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_import_platform_from_repo_root_gives_the_standard_library():
    # Given the repo root first on sys.path, as for `python -m pipelines.x` and Ray workers started there
    code = "import platform, sys; print(platform.__file__); print(platform.python_version())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    path, version = out.stdout.split()
    # Then `platform` is the stdlib module, not our source folder
    assert not Path(path).resolve().is_relative_to(REPO)
    assert version == ".".join(map(str, sys.version_info[:3]))


def test_library_is_importable_as_hlm_from_anywhere(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import hlm, hlm.encoder; print(hlm.__file__)"], cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).resolve() == REPO / "platform" / "hlm" / "__init__.py"


def test_code_passes_the_style_gate():
    ruff = Path(sys.executable).parent / "ruff"
    done = subprocess.run([str(ruff), "check", "platform", "pipelines", "serving", "tests", "bench"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_the_readme_lists_every_hlm_module():
    readme = (REPO / "README.md").read_text()
    modules = sorted(p.stem for p in (REPO / "platform/hlm").glob("*.py") if p.stem != "__init__")
    assert [m for m in modules if f"| `{m}` |" not in readme] == []
