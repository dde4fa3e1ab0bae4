"""``vgf-llm demo [ARGS]``: runs examples/toy_bandit.py of a source checkout (VGF vs best-of-N on a 2-D bandit);
ARGS go to it (e.g. --steps 0 --no_plot --out DIR; --help lists them)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from vgf_llm.cli import CLIError


def toy_example_path() -> Path:
    return Path(__file__).resolve().parents[2] / "examples" / "toy_bandit.py"


def run(argv: list[str]) -> int:
    path = toy_example_path()
    if not path.is_file():
        raise CLIError(f"the demo needs examples/toy_bandit.py from a source checkout (not found at {path}); "
                       "install vgf_llm from its repository with `pip install -e .`")
    saved = sys.argv
    sys.argv = [str(path), *argv]
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = saved
    return 0
