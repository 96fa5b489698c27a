"""``tier3 demo``: the whole flywheel on this machine (``tier3/demo/run.py``)."""

from tier3.demo.run import demo

__all__ = ["demo"]
