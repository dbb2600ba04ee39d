"""Every ```python block of README.md runs as written (the API examples are promises to the reader)."""

from __future__ import annotations

import ast
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_blocks() -> list[str]:
    with open(README) as fh:
        return re.findall(r"```python\n(.*?)```", fh.read(), flags=re.S)


# Packages a README example may import that a working install can lack (the `trl` extra; the GPU image has neither).
OPTIONAL_MODULES = frozenset({"trl", "datasets", "peft"})


def _top_level_imports(code: str) -> set[str]:
    """The top-level package names that a block's import statements name (`from a.b import c` gives "a")."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_readme_has_examples():
    assert len(_python_blocks()) >= 4


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_example_runs(index):
    code = _python_blocks()[index]
    # The TRL example needs the optional packages; where they are absent (the GPU machine's image), skip with why.
    for module in sorted(_top_level_imports(code) & OPTIONAL_MODULES):
        pytest.importorskip(module, reason=f"README example {index} imports {module}, which is not installed")
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": f"readme_{index}"})
