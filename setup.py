"""The native relay engine (wormholed/_engine.c); everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "wormholed._engine",
            ["wormholed/_engine.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        )
    ]
)
