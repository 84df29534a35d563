from bundle_store import store

__all__ = ["store"]
