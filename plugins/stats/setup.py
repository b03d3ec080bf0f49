"""Build the compiled hot path (``streambus_stats/_hot_c.pyx``) with Cython; everything else is in pyproject.toml.

The extension is optional: when it cannot be compiled (no C compiler) the
build says so and the plugin runs its pure-Python hot path
(``streambus_stats/_hot.py``), slower but with the same figures.
"""

import sys

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing when the extension does not compile."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # any compiler failure means: run the pure-Python path
            self.warn(f"streambus-stats: the hot path was not compiled ({exc}); the pure-Python one will run")
            self.extensions = []  # nothing built: nothing for the install to copy


setup(
    ext_modules=cythonize(
        [
            Extension(
                "streambus_stats._hot_c",
                ["streambus_stats/_hot_c.pyx"],
                # libm linked by name, so log2 binds to its current version (not the errno-setting
                # compatibility wrapper an unversioned symbol resolves to); llrint/ceil inline without errno.
                libraries=[] if sys.platform == "win32" else ["m"],
                extra_compile_args=[] if sys.platform == "win32" else ["-fno-math-errno"],
            )
        ],
        build_dir="build/cython",
        compiler_directives={"language_level": "3"},
    ),
    cmdclass={"build_ext": OptionalBuildExt},
)
