"""Retail-vision scan gateway in front of vLLM."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scanner-gateway")  # pyproject.toml is the one place it is set
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"
