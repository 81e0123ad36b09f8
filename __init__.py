"""Vedas model package (the repository root, installed as ``vedas``).

Attributes are imported lazily so that importing the package (as pytest does for the repository root) costs nothing.
"""

_EXPORTS = {
    "VedasConfig": "configuration_vedas",
    "Vedas25Config": "configuration_vedas",
    "Vedas3Config": "configuration_vedas",
    "VedasForConditionalGeneration": "modeling_vedas",
    "Vedas25ForConditionalGeneration": "modeling_vedas",
    "Vedas3ForConditionalGeneration": "modeling_vedas",
    "VedasChameleonConfig": "chameleon_vedas",
    "VedasChameleonForConditionalGeneration": "chameleon_vedas",
    "VedasCache": "routing_vedas",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
