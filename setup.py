"""Extension list for the compiled core.

Every ``pyx/pymllm/<pkg>/<name>.pyx`` becomes the extension ``pymllm.<pkg>.<name>``.
``pyx/`` mirrors the package path so that Cython finds each module's ``.pxd`` by its
dotted name and one module can ``cimport`` another (see ``include_path``).

Environment switches:
  PYMLLM_LINETRACE=1  compile with line tracing (coverage of the Cython code)
  PYMLLM_SANITIZE=1   compile with AddressSanitizer, the tree's big blocks from malloc too
                      (run under LD_PRELOAD=libasan; .ci/asan does it all)
  PYMLLM_SANITIZE=undefined  compile with UndefinedBehaviorSanitizer, without -fwrapv so
                      that signed overflow is reported (run under LD_PRELOAD=libubsan;
                      .ci/ubsan does it all)
  PYMLLM_DEBUG=1      compile with -O0 -g and bounds checks on
  PYMLLM_EXT_FILTER=a,b  build only the extensions whose name contains one of a, b
                         (development: rebuild one module in place while others are edited)
"""

import os
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

ROOT = Path(__file__).parent
PYX_ROOT = "pyx"

linetrace = os.environ.get("PYMLLM_LINETRACE") == "1"
sanitize = os.environ.get("PYMLLM_SANITIZE", "0")
debug = os.environ.get("PYMLLM_DEBUG") == "1"
ext_filter = [f for f in os.environ.get("PYMLLM_EXT_FILTER", "").split(",") if f]

directives = {
    "language_level": "3",
    "boundscheck": debug,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": debug,
    "embedsignature": True,
    # Argument Clinic's form: a method's signature goes to its __text_signature__ (inspect,
    # help) instead of the head of its docstring; a class's is written in its docstring,
    # "Name(...)\n--\n", which CPython reads the same way (Cython embeds none for a class
    # in this form).
    "embedsignature.format": "clinic",
    "linetrace": linetrace,
    # No pickling or copying generated for the extension types: allocators, caches and node
    # handles stand for slot ownership, which a copy would share (copy.copy) or forge
    # (__setstate__ of a handle naming any slot).
    "auto_pickle": False,
}

# -fwrapv as Python's own flags have it, which setuptools drops when CFLAGS is set: the code
# does not rely on signed wrap-around (UBSan, built without it, finds none left),
# but every build should compile the same arithmetic whatever the environment.
compile_args = (["-O0", "-g"] if debug else ["-O3"]) + ["-fwrapv"]
link_args: list[str] = []
macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
if linetrace:
    macros += [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")]
if sanitize == "1":
    compile_args = ["-O1", "-g", "-fwrapv", "-fsanitize=address", "-fno-omit-frame-pointer"]
    link_args = ["-fsanitize=address"]
    # the tree's blocks of 1 MiB and more (node array, heaps, child map) from malloc too,
    # not mmap, so that ASan sees a big tree's memory as well as a small one's
    macros += [("PYMLLM_BIG_BYTES", "SIZE_MAX")]
elif sanitize == "undefined":
    compile_args = ["-O1", "-g", "-fno-wrapv", "-fsanitize=undefined", "-fno-sanitize-recover=all"]
    compile_args += ["-fno-omit-frame-pointer"]
    link_args = ["-fsanitize=undefined"]
elif sanitize not in ("", "0"):
    raise SystemExit(f"PYMLLM_SANITIZE: expected 0, 1 or undefined, got {sanitize!r}")


def _extensions() -> list[Extension]:
    exts = []
    for pyx in sorted((ROOT / PYX_ROOT).rglob("*.pyx")):
        rel = pyx.relative_to(ROOT / PYX_ROOT).with_suffix("")
        if ext_filter and not any(f in rel.name for f in ext_filter):
            continue
        exts.append(
            Extension(
                ".".join(rel.parts),
                [str(pyx.relative_to(ROOT))],
                include_dirs=[np.get_include()],
                define_macros=macros,
                extra_compile_args=compile_args,
                extra_link_args=link_args,
            )
        )
    if not exts and not ext_filter:
        # an sdist without pyx/ would otherwise build a pure-Python wheel that fails on
        # its first import (pymllm.mem_cache._allocator missing)
        raise SystemExit(f"setup.py: no Cython sources under {ROOT / PYX_ROOT}: nothing to compile")
    return exts


# The switches each extension was last built with: cythonize and build_ext redo a build by
# timestamps only, so a switch changed after a build (PYMLLM_DEBUG=1 after a release build)
# would otherwise reuse the old generated C and binary without a word. Regenerating the C
# makes it newer than the binary, which build_ext then compiles again.
SWITCHES = f"debug={debug} linetrace={linetrace} sanitize={sanitize}"
STAMPS = ROOT / "build" / "pymllm-switches"


def _stale(exts: list[Extension]) -> bool:
    """Whether any of *exts* was last built with other switches (or not by this script)."""
    for ext in exts:
        stamp = STAMPS / ext.name
        if not stamp.is_file() or stamp.read_text() != SWITCHES:
            return True
    return False


def _stamp(exts: list[Extension]) -> None:
    STAMPS.mkdir(parents=True, exist_ok=True)
    for ext in exts:
        (STAMPS / ext.name).write_text(SWITCHES)


extensions = _extensions()
stale = _stale(extensions)
if stale:  # until this build ends well: a build that fails midway leaves no stamp to trust
    for ext in extensions:
        (STAMPS / ext.name).unlink(missing_ok=True)
setup(
    ext_modules=cythonize(
        extensions,
        include_path=[PYX_ROOT],
        compiler_directives=directives,
        annotate=False,
        force=stale,
    ),
)
_stamp(extensions)
