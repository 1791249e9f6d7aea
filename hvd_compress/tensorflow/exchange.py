"""An :class:`~hvd_compress.core.exchange.Exchange` whose state lives in ``tf.Variable``s.

Inside ``tf.function`` Python runs once, when the step is traced, so per-step
bookkeeping cannot live in Python objects. Here each tensor name gets, on first use and
outside any graph (``tf.init_scope``), an int64 step counter and one variable per field
of its feedback state; every traced step reads them, runs the shared pipeline and
assigns the new values. Telemetry records are written when the step runs (a
``tf.numpy_function`` callback with four scalars), so they count every executed step,
not every trace.
"""
from __future__ import annotations

import re
from typing import Any

from ..core.exchange import Exchange
from ..errors import HvdCompressError


def _tf():
    import tensorflow as tf
    return tf


def _scope_name(name: str) -> str:
    return "hvd_compress/" + re.sub(r"[^A-Za-z0-9_.\-/]", "_", name)


class VariableExchange(Exchange):
    """Exchange with per-name step counters and feedback state in ``tf.Variable``s."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.variables: dict[str, Any] = {}   # name -> state NamedTuple of variables
        self.step_vars: dict[str, Any] = {}   # name -> int64 step counter
        self._restored: dict = {}             # from load_state_dict, before creation

    def next_step(self, name: str):
        tf = _tf()
        counter = self.step_vars.get(name)
        if counter is None:
            with tf.init_scope():
                counter = tf.Variable(self._restored.get("steps", {}).get(name, 0),
                                      dtype=tf.int64, trainable=False,
                                      name=_scope_name(name) + "/step")
            self.step_vars[name] = counter
        return counter.assign_add(1) - 1

    def step_counts(self, names) -> list:
        restored = self._restored.get("steps", {})
        return [int(self.step_vars[n].numpy()) if n in self.step_vars else
                int(restored.get(n, 0)) for n in names]

    def load_state(self, bk, name: str, flat):
        if self.pipeline.feedback is None:
            return None
        state = self.variables.get(name)
        if state is None:
            state = self.variables[name] = self._create(bk, name, flat)
        tf = _tf()
        return type(state)(*[v.read_value() if isinstance(v, tf.Variable) else v
                             for v in state])

    def _create(self, bk, name, flat):
        """One variable per tensor or integer field of the state (a step count); float
        fields are constants of the rule (DIANA's alpha) and stay Python floats."""
        tf = _tf()
        if not flat.shape.is_fully_defined():
            raise HvdCompressError(
                f"gradient {name!r} has shape {flat.shape} inside the graph: feedback state "
                "needs a static shape")
        restored = self._restored.get("states", {}).get(name)
        with tf.init_scope():
            fresh = self.pipeline.init(bk, tf.zeros(flat.shape, flat.dtype))
            values = fresh._asdict() if restored is None else restored
            fields = {}
            for field, init in fresh._asdict().items():
                if isinstance(init, float):
                    fields[field] = init
                    continue
                dtype = tf.int64 if isinstance(init, int) else init.dtype
                fields[field] = tf.Variable(values[field], dtype=dtype, trainable=False,
                                            name=f"{_scope_name(name)}/{field}")
            return type(fresh)(**fields)

    def commit_state(self, name: str, state):
        tf = _tf()
        for var, value in zip(self.variables.get(name, ()), state or ()):
            if isinstance(var, tf.Variable):
                var.assign(value)

    def log(self, step, name, nbytes, count, numel, dense_bits, seconds, error):
        tf = _tf()
        if tf.executing_eagerly():
            return super().log(step, name, nbytes, count, numel, dense_bits, seconds, error)

        def record(step, nbytes, count, *error):
            Exchange.log(self, step, name, nbytes, count, numel, dense_bits, None,
                         error or None)
            return []

        scalars = [tf.cast(x, tf.int64) for x in (step, nbytes, count)]
        if error is not None:
            scalars += [tf.cast(e, tf.float64) for e in error]
        tf.numpy_function(record, scalars, [], stateful=True, name="hvd_compress_telemetry")

    # -- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Format, rank, world size, spec, seed, step counters and feedback state (numpy
        arrays), including restored values whose variables do not exist yet."""
        steps = dict(self._restored.get("steps", {}))
        steps.update({k: int(v.numpy()) for k, v in self.step_vars.items()})
        states = dict(self._restored.get("states", {}))
        states.update({k: {f: _numpy(v) for f, v in s._asdict().items()}
                       for k, s in self.variables.items()})
        return {**self._checkpoint_header(), "steps": steps, "states": states}

    def load_state_dict(self, sd: dict):
        self._check_checkpoint(sd)
        states = {k: {f: _numpy(v) for f, v in s.items()}
                  for k, s in sd["states"].items() if s is not None}
        self._restored = {"steps": dict(sd["steps"]), "states": states}
        self._loaded = set(states)
        for name, counter in self.step_vars.items():
            counter.assign(int(sd["steps"].get(name, 0)))
        for name, state in self.variables.items():
            values = states.get(name)
            if values is None:
                raise HvdCompressError(f"checkpoint has no feedback state for {name!r}")
            for field, var in state._asdict().items():
                if hasattr(var, "assign"):
                    var.assign(values[field])


def _numpy(v):
    """Tensors and variables as numpy arrays (integer step counts as ints)."""
    if not hasattr(v, "numpy"):
        return v
    a = v.numpy()
    return int(a) if getattr(a, "ndim", 1) == 0 and a.dtype.kind == "i" else a
