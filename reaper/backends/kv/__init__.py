"""Key-value stores written by py-key-value (FastMCP's OAuthProxy: Redis and its encrypted file tree)."""

from reaper.backends.kv.backend import KvBackend

__all__ = ["KvBackend"]
