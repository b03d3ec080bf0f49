"""Build the compiled twin of the aggregator's per-event path (``streambus_stats/_compiled.pyx``) with Cython.

Everything else is in pyproject.toml. The extension is optional: when it
cannot be compiled (no C compiler) the build says so and the plugin runs its
pure-Python path, the behaviour reference, with the same figures (slower).
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
            self.warn(f"streambus-stats: the per-event path was not compiled ({exc}); the pure-Python one will run")
            self.extensions = []  # nothing built: nothing for the install to copy


setup(
    ext_modules=cythonize(
        [
            Extension(
                "streambus_stats._compiled",
                ["streambus_stats/_compiled.pyx"],
                # libm by name: pow() and rint() are the ones Python's float arithmetic uses.
                libraries=[] if sys.platform == "win32" else ["m"],
            )
        ],
        build_dir="build/cython",
        compiler_directives={"language_level": "3"},
    ),
    cmdclass={"build_ext": OptionalBuildExt},
)
