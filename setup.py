"""Build the optional compiled LoGM kernel; everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and LoGM falls back to the
exact (slower) pure-torch path, so the package stays installable everywhere.
"""

import sys

from setuptools import Extension, setup

COMPILE_ARGS = [] if sys.platform == "win32" else ["-O3", "-fno-math-errno"]

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
