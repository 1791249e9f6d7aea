"""What every registered algorithm shares: parameters, a canonical spec, equality."""
from __future__ import annotations

import inspect


class Algorithm:
    """Base of compressors, feedback rules and policies.

    Subclasses store each constructor argument under its own name; ``params()`` and
    ``spec()`` read them back, so an object and its spec string always agree.
    """
    name = "abstract"
    kind = "abstract"

    def params(self) -> dict:
        """Constructor arguments, in signature order, that differ from their defaults."""
        out = {}
        for p in inspect.signature(type(self).__init__).parameters.values():
            if p.name == "self":
                continue
            v = getattr(self, p.name)
            if v != p.default:
                out[p.name] = v
        return out

    def spec(self) -> str:
        args = ",".join(f"{k}={_fmt(v)}" for k, v in self.params().items())
        return self.name + (":" + args if args else "")

    def __repr__(self):
        return f"<{type(self).__name__} {self.spec()!r}>"

    def __eq__(self, other):
        return type(self) is type(other) and self.params() == other.params()

    def __hash__(self):
        return hash(self.spec())


def _fmt(v) -> str:
    """A value as the spec parser reads it back: floats keep a '.' or an exponent (so they
    stay floats) and lose the '+' of repr's "1e+20" (a stage separator in specs)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, float):
        return repr(v).replace("e+", "e")
    return str(v)
