"""The README's Python blocks run as written: in order, in one namespace, on whatever device is here (CPU in CI).

A block that imports an optional extra is skipped (with the rest after it) where that extra is missing; CI installs
the extras the README uses (transformers, peers, trl), so there every block runs.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
#: Modules of optional extras a block may import, checked before the block runs.
EXTRAS = ("transformers", "trl", "datasets", "tokenizers", "liger_kernel")


def python_blocks(text: str):
    """(line number, source) of every ```python block, in order."""
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)]


def test_readme_has_python_blocks():
    blocks = python_blocks(open(README).read())
    assert len(blocks) >= 4
    assert all("device=\"cuda\"" not in src for _, src in blocks)  # the device is chosen at run time


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write (a trainer's output_dir) write here
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: one thread avoids waiting for time slices on a loaded machine
    namespace: dict = {"__name__": "readme"}
    try:
        for line, src in python_blocks(open(README).read()):
            for module in EXTRAS:
                if re.search(rf"^\s*(from|import)\s+[\w., ]*\b{module}\b", src, flags=re.M):
                    pytest.importorskip(module)
            exec(compile(src, f"README.md:{line}", "exec"), namespace)
    finally:
        torch.set_num_threads(before)
