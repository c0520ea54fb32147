"""The sdist carries every file the CMake build reads, so `pip install` from it can build."""
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _build_inputs():
    files = {"CMakeLists.txt"}
    for folder in ("cmake", "csrc"):
        files |= {str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*") if p.is_file()}
    return files


def test_sdist_holds_the_build_inputs(tmp_path):
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
                    "sdist", "--dist-dir", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True)
    (sdist,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = sorted(_build_inputs() - names)
    assert not missing, f"MANIFEST.in leaves these build inputs out of the sdist: {missing}"
