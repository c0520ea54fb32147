"""Builds anyexperts_ops._C with CMake + ninja (see CMakeLists.txt).

Install against the torch already present, without build isolation:
    pip install --no-build-isolation .

Environment:
    ANYEXPERTS_CUDA        auto (default) | 1 (fail if CUDA cannot be built) | 0
    ANYEXPERTS_CUDA_ARCHS  CUDA archs, e.g. "90a" or "80;90a" (default "80;90a")
    CUTLASS_DIR            CUTLASS checkout to use instead of the nvidia-cutlass package
    CUDA_HOME              CUDA toolkit (default: the one holding nvcc on PATH)
    MAX_JOBS               parallel compile jobs (default: CPU count)
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def _find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


_OFF = ("0", "off", "false", "no")
_ON = ("1", "on", "true", "yes")


def _cuda_enabled():
    mode = os.environ.get("ANYEXPERTS_CUDA", "auto").lower()
    if mode not in ("auto", *_OFF, *_ON):
        sys.exit(f"ANYEXPERTS_CUDA must be auto, 1 (on) or 0 (off), got {mode!r}")
    if mode in _OFF:
        return False
    import torch

    nvcc = _find_nvcc()
    possible = torch.version.cuda is not None and nvcc is not None
    if mode in _ON:
        if not possible:
            sys.exit("ANYEXPERTS_CUDA=1 but CUDA cannot be built: "
                     f"torch.version.cuda={torch.version.cuda}, nvcc={nvcc}")
        return True
    if torch.version.cuda is not None and nvcc is None:
        print("anyexperts_ops: building WITHOUT the CUDA kernels: torch is a CUDA build but nvcc "
              "was not found (set CUDA_HOME; ANYEXPERTS_CUDA=1 makes this an error)",
              file=sys.stderr)
    return possible


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = _cuda_enabled()
        args = [
            "-G", "Ninja",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
            f"-DANYEXPERTS_CUDA={'ON' if cuda else 'OFF'}",
        ]
        if cuda:
            args.append(f"-DCMAKE_CUDA_COMPILER={_find_nvcc()}")
            if "ANYEXPERTS_CUDA_ARCHS" in os.environ:
                args.append(f"-DANYEXPERTS_CUDA_ARCHS={os.environ['ANYEXPERTS_CUDA_ARCHS']}")
        print(f"anyexperts_ops: building with CUDA {'on' if cuda else 'off'}", flush=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", str(ROOT), *args], cwd=build_dir)
        subprocess.check_call(["cmake", "--build", ".", "-j", jobs], cwd=build_dir)


setup(
    ext_modules=[Extension("anyexperts_ops._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
