"""Build of the one native module, the data plane's record loops.

``optional``: where no C compiler is at hand the install still succeeds and
``peerd.datapump`` falls back to the pure-Python record loops (slower, same
bytes on the wire).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "peerd._datapump",
            ["peerd/_datapump.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
