from .definitions import defs

__all__ = ["defs"]
