"""Instances whose class AutoEP swapped for a subclass made at run time (the router of the block
mode, the experts module of the experts mode) pickle as the stock instance would: the original class
(which can be found by name) is pickled, and the subclass is made again on load."""

from __future__ import annotations


def rebuild_swapped(original: type, make_class, state: dict):
    """Unpickle an instance whose class AutoEP made at run time (``make_class(original)``): the
    original class is found by name, the AutoEP subclass made again, the instance's state restored."""
    instance = original.__new__(original)
    instance.__dict__.update(state)
    instance.__class__ = make_class(original)
    return instance
