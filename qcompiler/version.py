"""The package version, read from the installed distribution's metadata."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("qcompiler")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
