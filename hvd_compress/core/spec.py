"""Spec strings <-> algorithm objects.

Grammar::

    spec  := stage ("+" stage)*
    stage := NAME [":" arg ("," arg)*]
    arg   := VALUE | KEY "=" VALUE          VALUE: int, float, true/false, none, or a word

The first stage names a compressor; later stages name feedback rules or policies, e.g.
``"topk:0.01"``, ``"qsgd:s=15,bucket=256"``, ``"randk:0.05,scaled=true"``. Positional
values fill the constructor's parameters in order. Numbers are ASCII decimals (``-3``,
``0.5``, ``1e-3``, ``1e20``: no ``+`` in exponents, since ``+`` separates stages) or
nan/inf, which every parameter refuses; anything else is a word, which numeric parameters
refuse too. ``obj.spec()`` writes the canonical string back, ``resolve(obj.spec()) == obj``,
and ``resolve`` accepts a spec or an object wherever either is expected.
"""
from __future__ import annotations

import inspect
import re

from ..errors import HvdCompressError
from .registry import lookup

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_INT = re.compile(r"-?[0-9]+")
_FLOAT = re.compile(r"-?([0-9]+\.?[0-9]*|\.[0-9]+)(e-?[0-9]+)?|-?(inf|nan)", re.IGNORECASE)
_PLUS_EXPONENT = re.compile(r"[0-9.]e\+[0-9]+", re.IGNORECASE)  # "1e+6": never a stage break


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if _INT.fullmatch(text) and len(text) < 1000:  # int() refuses 4300 digits; float: inf
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def parse(spec: str) -> list[tuple[str, list, dict]]:
    """Split a spec string into stages ``(name, positional args, keyword args)``."""
    if not isinstance(spec, str) or not spec.strip():
        raise HvdCompressError(f"empty compression spec {spec!r}; try e.g. 'topk:0.01'")
    exponent = _PLUS_EXPONENT.search(spec)
    if exponent:
        raise HvdCompressError(f"spec {spec!r}: '+' separates stages; write the exponent "
                               f"{exponent.group()!r} without it")
    stages = []
    for raw in spec.split("+"):
        raw = raw.strip()
        name, _, argtext = raw.partition(":")
        name = name.strip().lower()
        if not _NAME.match(name):
            raise HvdCompressError(f"spec {spec!r}: bad algorithm name {name!r}")
        args, kwargs = [], {}
        if argtext.strip():
            for item in argtext.split(","):
                item = item.strip()
                if not item:
                    raise HvdCompressError(f"spec {spec!r}: empty argument in stage {raw!r}")
                if "=" in item:
                    k, _, v = item.partition("=")
                    k = k.strip()
                    if k in kwargs:
                        raise HvdCompressError(f"spec {spec!r}: argument {k!r} given twice")
                    kwargs[k] = _value(v.strip())
                elif kwargs:
                    raise HvdCompressError(
                        f"spec {spec!r}: positional argument {item!r} after keyword arguments")
                else:
                    args.append(_value(item))
        stages.append((name, args, kwargs))
    return stages


def build(name: str, args: list, kwargs: dict, kinds, spec: str = ""):
    """Instantiate a registered algorithm, with errors that name the bad argument."""
    _, cls = lookup(name, kinds)
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    if len(args) > len(params):
        raise HvdCompressError(
            f"spec {spec or name!r}: {name} takes at most {len(params)} positional arguments "
            f"({', '.join(p.name for p in params)}), got {len(args)}")
    names = {p.name for p in params}
    for k in kwargs:
        if k not in names:
            raise HvdCompressError(
                f"spec {spec or name!r}: {name} has no parameter {k!r}; "
                f"its parameters are {', '.join(sorted(names)) or '(none)'}")
    for p, v in zip(params, args):
        if p.name in kwargs:
            raise HvdCompressError(
                f"spec {spec or name!r}: {name} got {p.name} twice, as the positional "
                f"argument {v!r} and as {p.name}={kwargs[p.name]!r}")
    try:
        return cls(*args, **kwargs)
    except HvdCompressError:
        raise
    except (TypeError, ValueError) as e:  # a registered class that checks less than ours
        raise HvdCompressError(f"spec {spec or name!r}: {name} refused its arguments: {e}") \
            from e


def resolve_compressor(obj):
    """A compressor object from a spec string or a compressor (returned as is)."""
    from .compressor import Compressor
    if isinstance(obj, Compressor):
        return obj
    if isinstance(obj, str):
        stages = parse(obj)
        if len(stages) > 1:
            raise HvdCompressError(
                f"spec {obj!r}: expected a compressor alone; pipelines with feedback go "
                "through resolve_pipeline / hvd_compress.resolve")
        name, args, kwargs = stages[0]
        return build(name, args, kwargs, ("compressor",), obj)
    raise HvdCompressError(
        f"expected a spec string or a Compressor, got {type(obj).__name__}: {obj!r}")
