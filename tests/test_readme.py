"""The README's Python examples and the examples/ demos run as written (on the CPU)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    torch.manual_seed(0)
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {})


@pytest.mark.parametrize("script", ["demo.py", "layer_demo.py"])
def test_examples_run(script):
    """The README's quick-start demo and the layer demo run and pass their own checks (the
    demo asserts that the op pipeline matches the reference)."""
    path = README.parent / "examples" / script
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "|" in done.stdout, done.stdout[-2000:]
