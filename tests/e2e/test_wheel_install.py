"""A non-editable install works: the wheel built from this tree, installed into a fresh venv, gives
``twistd kvmdesk`` (its twistd plugin lands in site-packages/twisted/plugins, beside Twisted's own).

Marked ``wheel`` so that ``-m "not wheel"`` can leave it out; it runs by default (about a minute:
dependencies come from pip's cache or the configured indexes).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parents[2]
IGNORED = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                 "tests", "bench")


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done


def test_the_wheel_installs_into_a_fresh_venv_and_twistd_finds_kvmdesk(tmp_path):
    # A copy of the tree: an in-tree build would leave build/ and *.egg-info in the checkout.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=IGNORED)
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)])
    (wheel,) = wheels.glob("kvmdesk-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/kvmdesk_plugins.py" in names
    # Twisted's own package files must not be shadowed (no twisted/__init__.py, no plugins/__init__.py),
    # and no dropin cache is shipped (Twisted rebuilds it where it can write).
    assert not {"twisted/__init__.py", "twisted/plugins/__init__.py"} & names
    assert not any(name.endswith("dropin.cache") for name in names)
    assert {"kvmdesk/config/defaults.toml", "kvmdesk/api/static/docs.html"} <= names

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    run([str(python), "-m", "pip", "install", "-q", str(wheel)], env=env)

    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    plugins = site / "twisted" / "plugins"
    assert (plugins / "kvmdesk_plugins.py").is_file()
    assert (plugins / "__init__.py").is_file()  # Twisted's, still there

    outside = tmp_path / "elsewhere"  # not the checkout: only the installed files can be found
    outside.mkdir()
    listing = run([str(venv / "bin" / "twistd"), "--help"], cwd=outside, env=env).stdout
    assert "kvmdesk" in listing and "kvmdesk-agent" in listing
    usage = run([str(venv / "bin" / "twistd"), "kvmdesk", "--help"], cwd=outside, env=env).stdout
    assert "--data-dir" in usage and "--config" in usage
    assert "--libvirt-uri" in run([str(venv / "bin" / "twistd"), "kvmdesk-agent", "--help"], cwd=outside, env=env).stdout
    # Twisted wrote its plugin cache next to the plugins, where this venv can write.
    assert (plugins / "dropin.cache").is_file()
