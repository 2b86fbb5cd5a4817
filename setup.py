"""Builds engine/sampling/_kernels.c, the CPU kernels of engine/sampling/kernels.py; everything else is in pyproject.toml.

The extension is optional: where it cannot be built (no C compiler), the install still succeeds and the
engine chooses with torch operations instead (slower on a CPU, the same rules)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("engine.sampling._kernels", ["engine/sampling/_kernels.c"], optional=True,
                             extra_compile_args=["-O3", "-fopenmp-simd", "-fno-trapping-math", "-Wall"])])
