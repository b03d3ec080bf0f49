"""Build the compiled hot path (``streambus_stats/_hot_c.pyx``) with Cython; everything else is in pyproject.toml.

The extension is optional: without a C compiler the build warns and the
plugin runs its pure-Python hot path (``streambus_stats/_hot.py``), slower
but with the same figures.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("streambus_stats._hot_c", ["streambus_stats/_hot_c.pyx"], optional=True)],
        build_dir="build/cython",
        compiler_directives={"language_level": "3"},
    ),
)
