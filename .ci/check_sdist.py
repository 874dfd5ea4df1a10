"""Check an sdist of this project: it must carry every Cython source the build compiles,
what the test suite imports and the CI scripts .ci/run runs, and none of the C that Cython
generates.

Usage: python .ci/check_sdist.py dist/pymllm-X.tar.gz (from the repository root)
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path


def main(sdist: str) -> int:
    with tarfile.open(sdist) as tar:
        shipped = {Path(*Path(name).parts[1:]).as_posix() for name in tar.getnames()}
    root = Path(__file__).resolve().parents[1]
    need = {
        p.relative_to(root).as_posix()
        for pattern in ("pyx/**/*.pyx", "pyx/**/*.pxd", "tests/*.py", "bench/*.py")
        for p in root.glob(pattern)
    }
    need |= {
        "pymllm/py.typed",
        "pymllm/mem_cache/py.typed",
        "pymllm/mem_cache/_radix_tree.pyi",
        "pymllm/mem_cache/_allocator.pyi",
    }
    # .ci/run ships, so whatever .ci/ script it runs ships with it
    ci_run = (root / ".ci" / "run").read_text()
    need |= {
        p.relative_to(root).as_posix()
        for p in (root / ".ci").iterdir()
        if p.is_file() and f".ci/{p.name}" in ci_run
    }
    missing = sorted(need - shipped)
    generated = sorted(n for n in shipped if n.endswith((".c", ".so")))
    for name in missing:
        print(f"check_sdist: missing {name}", file=sys.stderr)
    for name in generated:
        print(f"check_sdist: shipped a build product {name}", file=sys.stderr)
    if not missing and not generated:
        print(f"check_sdist: {sdist}: {len(need)} required files present, no build products")
    return 1 if missing or generated else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
