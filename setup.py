"""Build script: everything is declared in setup.cfg except the optional native scanner.

``esmtpkit.core._scan`` speeds up the DATA path. It is optional: without a C compiler or Python's headers the build
warns and goes on, and ``esmtpkit.core.content`` uses its pure-Python scan instead (same results, slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("esmtpkit.core._scan", ["esmtpkit/core/_scan.c"], optional=True)])
