"""dcr-reaper: find and safely reap orphaned Dynamic Client Registration clients."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dcr-reaper")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"
