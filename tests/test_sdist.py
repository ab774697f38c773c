"""The source distribution: it carries every source the build needs, builds without
warnings, and a wheel built from it in a fresh environment loads its compiled kernels.

`pip install steplaw-0.1.0.tar.gz` is how most users meet the build, and it is the one
install path the editable development install never exercises. The wheel is built with
the C++ kernels only (STEPLAW_NO_CUDA=1) and at -O1 (STEPLAW_QUICK_BUILD=1) to keep
CI short; the fresh environment sees
the torch already installed here (through a .pth line) so that nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Files outside the packages that a build from the sdist or its metadata needs.
TOP_LEVEL = ["setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"]


def _clean_copy(dest: Path) -> Path:
    """The files a fresh clone would hold (tracked, or new and not ignored), copied to
    dest. Building in the working tree would not do: setuptools adds every file listed in
    a leftover steplaw.egg-info/SOURCES.txt, which hides a manifest that lacks them."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, timeout=60,
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot tell the source files from build leftovers")
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def _build_sdist(src: Path, out_dir: Path) -> tuple[Path, str]:
    """Build the sdist of the tree at src with setuptools' PEP 517 backend, as `python -m
    build --sdist --no-isolation` would; returns the archive and everything it printed."""
    code = (
        "import sys\n"
        "from setuptools import build_meta\n"
        "print(build_meta.build_sdist(sys.argv[1]))\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out_dir)], cwd=src, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name = proc.stdout.strip().splitlines()[-1]
    return out_dir / name, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> tuple[Path, str]:
    src = _clean_copy(tmp_path_factory.mktemp("src"))
    return _build_sdist(src, tmp_path_factory.mktemp("sdist"))


def test_sdist_carries_every_build_source(sdist):
    archive, _ = sdist
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    prefix = names[0].split("/")[0]
    inside = {name.removeprefix(prefix + "/") for name in names}
    wanted = [p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()]
    wanted += [p.relative_to(ROOT).as_posix() for p in (ROOT / "steplaw").rglob("*.py")]
    wanted += [p.relative_to(ROOT).as_posix() for p in (ROOT / "steplaw" / "data" / "corpus").iterdir()]
    wanted += TOP_LEVEL
    missing = sorted(set(wanted) - inside)
    assert not missing, f"the sdist lacks: {missing}"


def test_sdist_builds_without_warnings(sdist):
    _, log = sdist
    warnings = [line for line in log.splitlines() if "warning" in line.lower()]
    assert not warnings, "\n".join(warnings)


def _fresh_venv(where: Path) -> Path:
    """A new virtual environment whose only extra path is this environment's
    site-packages (torch, setuptools, pip): not its steplaw, which is imported through an
    editable finder that a plain path line does not install."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "_steplaw_test_base.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python


# Run inside the fresh environment, from a directory without a steplaw/ beside it.
_CHECK = """
import json, torch, steplaw
from steplaw import ops
from steplaw.optim import FusedAdamW

ours = torch.nn.Parameter(torch.linspace(-1, 1, 1000, dtype=torch.float32))
theirs = torch.nn.Parameter(ours.detach().clone())
opt_ours = FusedAdamW([ours], lr=1e-2, weight_decay=0.1)
opt_theirs = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1)
for step in range(3):
    for p, opt in ((ours, opt_ours), (theirs, opt_theirs)):
        opt.zero_grad()
        (p.sin() * (step + 1)).sum().backward()
        opt.step()
print(json.dumps({
    "file": steplaw.__file__,
    "loaded": ops.load_extension(),
    "error": ops.load_error(),
    "kernels": ops.kernel_table(),
    "max_abs_diff_vs_torch_adamw": (ours - theirs).abs().max().item(),
}))
"""


@pytest.mark.slow
def test_wheel_built_from_the_sdist_installs_and_loads_its_kernels(sdist, tmp_path):
    archive, _ = sdist
    python = _fresh_venv(tmp_path / "venv")
    # -O1: the build checks what the sdist carries and that its wheel loads, not speed
    env = {**os.environ, "STEPLAW_NO_CUDA": "1", "STEPLAW_QUICK_BUILD": "1"}
    env.pop("PYTHONPATH", None)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
         "--no-cache-dir", "--ignore-installed", str(archive)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert install.returncode == 0, install.stdout[-4000:] + install.stderr[-4000:]

    check = subprocess.run(
        [str(python), "-c", _CHECK], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert check.returncode == 0, check.stderr[-4000:]
    info = json.loads(check.stdout.strip().splitlines()[-1])
    assert Path(info["file"]).is_relative_to(tmp_path / "venv"), info["file"]
    assert info["loaded"], info["error"]
    assert info["kernels"] and all(has["cpu"] for has in info["kernels"].values()), info["kernels"]
    assert info["max_abs_diff_vs_torch_adamw"] < 1e-5

    doctor = subprocess.run(
        [str(tmp_path / "venv" / "bin" / "steplaw"), "doctor", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert doctor.returncode == 0, doctor.stderr[-2000:]
    assert json.loads(doctor.stdout)["extension_loaded"] is True
