"""The README's embedding example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_embedding_example_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    cache, alloc = namespace["cache"], namespace["alloc"]
    cache._check_invariants()
    # every slot is free or in the tree: none leaked by the example
    assert alloc.available_size() + cache.total_size() == 4096
