"""What `pip install .` installs: one import name, `memvq` (the layout's folders as its subpackages) with its data,
and nothing called `data`, `memory`, ... that would collide in a user's environment."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_only_memvq_and_its_data(tmp_path):
    pip = [sys.executable, "-m", "pip"]
    # from a copy of the checkout: an in-tree build directory left by an earlier build would hide missing packages
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "runs", "build", "*.egg-info", "__pycache__"))
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path, source], check=True)
    [wheel] = tmp_path.glob("memvq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"memvq", f"{wheel.name.split('-py3')[0]}.dist-info"}
    for data in ("encoders/weights/minilm-default/reader.pt", "encoders/weights/minilm-codec/vq.pt"):
        assert f"memvq/{data}" in names
    assert "memvq/serve/static/index.html" in names
    folders = {"memvq": "memvq", **{name: f"memvq/{name}" for name in ("data", "memory", "retrieval", "encoders")}}
    folders["pipelines"] = "memvq/pipelines"
    modules = {
        f"{package}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder, package in folders.items()
        for path in (ROOT / folder).rglob("*.py")
    }
    assert modules - set(names) == set(), "modules of the checkout missing from the wheel"

    # a clean environment with the wheel alone (no dependencies: the package face imports them on first use)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", python, "install", "-q", "--no-deps", wheel], check=True)
    check = "import memvq, importlib.util as u; print(sorted(memvq.__all__)[0], [u.find_spec(n) for n in %r])"
    bare = ("data", "memory", "retrieval", "encoders", "pipelines")
    done = subprocess.run([python, "-c", check % (bare,)], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"BuildConfig {[None] * len(bare)}"
    refused = subprocess.run([python, "-c", "import data"], cwd=tmp_path, capture_output=True, text=True)
    assert refused.returncode == 1 and "No module named 'data'" in refused.stderr
