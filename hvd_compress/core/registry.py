"""The one registry of algorithm names.

Every compressor, feedback rule and policy registers its spec name here with a decorator;
the spec parser, the docs' list of algorithms and the frontends all read this registry, so
adding an algorithm is one decorated class and nothing else.
"""
from __future__ import annotations

from ..errors import HvdCompressError

KINDS = ("compressor", "feedback", "policy", "perturbation")
_REGISTRY: dict[str, dict[str, type]] = {k: {} for k in KINDS}


def register(kind: str, name: str):
    """Class decorator: make ``cls`` reachable as ``name`` in spec strings."""
    if kind not in KINDS:
        raise HvdCompressError(f"unknown registry kind {kind!r}; expected one of {KINDS}")

    def deco(cls):
        if name in _REGISTRY[kind] and _REGISTRY[kind][name] is not cls:
            raise HvdCompressError(f"{kind} name {name!r} is already registered")
        cls.name = name
        cls.kind = kind
        _REGISTRY[kind][name] = cls
        return cls
    return deco


def lookup(name: str, kinds=KINDS):
    """(kind, class) registered under ``name`` among ``kinds``."""
    for kind in kinds:
        if name in _REGISTRY[kind]:
            return kind, _REGISTRY[kind][name]
    known = ", ".join(sorted(n for k in kinds for n in _REGISTRY[k]))
    raise HvdCompressError(f"unknown algorithm {name!r}; known names: {known}")


def available(kind: str | None = None) -> list[str]:
    """Sorted names registered for ``kind`` (all kinds when None)."""
    kinds = KINDS if kind is None else (kind,)
    return sorted(n for k in kinds for n in _REGISTRY[k])
