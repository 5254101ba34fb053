"""The NumPy digits example: register this directory as the function's code (handler.handler)."""

from simulator.handler import handler

__all__ = ["handler"]
