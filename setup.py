"""The native relay engine (wormholed/_engine.c: plain C, and an empty extension module so
that it is found by name; wormholed/engine.py drives it through ctypes) and the `wormhole`
script (bin/wormhole: no console_scripts launcher, whose `import re` would slow every
command); the rest is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    scripts=["bin/wormhole"],
    ext_modules=[
        Extension(
            "wormholed._engine",
            ["wormholed/_engine.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        )
    ]
)
