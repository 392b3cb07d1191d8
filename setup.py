"""Build table for the Cython kernels: every cykernels/<name>.pyx becomes cykernels.<name>.

The table is the directory listing; one loop turns it into extensions, so adding a kernel
module is adding a .pyx file and nothing else.
"""

import os
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

# -O3 vectorises the elementwise loops; -fno-math-errno lets sqrt/exp vectorise too.
# No -ffast-math: it would break NaN/Inf detection and bitwise determinism.
COMPILE_ARGS = ["-O3", "-fno-math-errno", "-fno-trapping-math"]

KERNEL_MODULES = sorted(path.stem for path in Path("cykernels").glob("*.pyx"))
# Development aid: ZEROTRAIN_KERNELS="optim losses" builds only those modules.
if os.environ.get("ZEROTRAIN_KERNELS"):
    KERNEL_MODULES = [m for m in KERNEL_MODULES if m in os.environ["ZEROTRAIN_KERNELS"].split()]

extensions = [
    Extension(
        f"cykernels.{name}",
        [f"cykernels/{name}.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=COMPILE_ARGS,
    )
    for name in KERNEL_MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
