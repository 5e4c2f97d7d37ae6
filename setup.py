"""Build the optional compiled LoGM kernel; everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and LoGM falls back to the
exact (slower) pure-torch path, so the package stays installable everywhere.
"""

import sys

from setuptools import Extension, setup

# -ffp-contract=off: no fused multiply-add, so that products are rounded before they are summed,
# as NumPy rounds them when it stores them (compare_segments matches np.add.reduceat bit for bit).
# (MSVC does not contract by default.)
COMPILE_ARGS = [] if sys.platform == "win32" else ["-O3", "-fno-math-errno", "-ffp-contract=off"]

setup(
    ext_modules=[
        Extension(
            "pytest_convergence._logm_kernel",
            ["pytest_convergence/_logm_kernel.c"],
            extra_compile_args=COMPILE_ARGS,
            optional=True,
        )
    ]
)
