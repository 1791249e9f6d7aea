"""A pipeline is what a frontend runs per tensor: optional feedback around a compressor.

    pipe = resolve_pipeline("topk:0.01+ef21sgdm:eta=0.1")
    state = pipe.init(bk, flat)
    payload, codec, state, _ = pipe.encode(bk, flat, state, key)  # on each rank
    ... every rank's payload travels; mean, finite = codec.mean(bk, payloads, n) ...
    update, state = pipe.decode(bk, mean, state)                 # on each rank

``codec`` is the compressor that produced this step's payload: the pipeline's own, or
``none`` during the first ``dense_steps`` steps (a dense warm-up that initialises the
feedback state exactly).
"""
from __future__ import annotations

from typing import Any, NamedTuple

from ..errors import HvdCompressError
from .casts import Identity
from .compressor import Compressor, check_int
from .feedback import Feedback
from .ops import Backend
from .payload import Payload
from .registry import lookup
from .rng import Key
from .spec import build, parse, resolve_compressor


class Encoded(NamedTuple):
    payload: Payload
    codec: Compressor  # the compressor that produced the payload (decodes every rank's)
    state: Any         # the feedback rule's state (a NamedTuple of tensors), or None
    error: Any         # (||C(v) - v||^2 / ||v||^2, ||C(v) - v||^2) of the vector v
    #                    compressed, if measured


class Pipeline:
    """A compressor, optionally wrapped by a feedback rule and driven by a level policy.

    Args:
      compressor: spec or object.
      feedback: a feedback rule or None.
      policy: a policy choosing the compression level each step (``dynamic``) or None.
      dense_steps: how many first steps send the uncompressed tensor.
      perturbation: noise added to every gradient before feedback (``perturb``) or None.
    """

    def __init__(self, compressor, feedback=None, policy=None, dense_steps: int = 0,
                 perturbation=None):
        self.compressor = resolve_compressor(compressor)
        self.perturbation = perturbation
        if feedback is not None:
            feedback.check(self.compressor)
        if policy is not None:
            policy.check(self.compressor, feedback)
        self.feedback, self.policy = feedback, policy
        self.dense_steps = check_int("warmup", "dense_steps", dense_steps, 0)
        self._dense = Identity()

    def spec(self) -> str:
        s = self.compressor.spec()
        for stage in (self.feedback, self.policy, self.perturbation):
            if stage is not None:
                s += "+" + stage.spec()
        if self.dense_steps:
            s += f"+warmup:{self.dense_steps}"
        return s

    def __repr__(self):
        return f"<Pipeline {self.spec()!r}>"

    def __eq__(self, other):
        return isinstance(other, Pipeline) and self.spec() == other.spec()

    def codec(self, step) -> Compressor:
        """The compressor whose payloads travel at ``step``."""
        if not self.dense_steps:
            return self.compressor
        if not isinstance(step, int):
            raise HvdCompressError(
                f"{self.spec()}: the warm-up phase of a graph-tensor step must be given "
                "(encode(..., dense=...))")
        return self._dense if step < self.dense_steps else self.compressor

    def init(self, bk, flat):
        return None if self.feedback is None else self.feedback.init(bk, flat, self.compressor)

    @property
    def agrees(self) -> bool:
        """Whether ranks agree on the level (dynamic:agree=true): see :meth:`encode`."""
        return self.policy is not None and self.policy.agree

    def encode(self, bk, flat, state, key: Key, measure: bool = False,
               gather=None, dense=None, model_size=None, level=None,
               owned: bool = False, undo: list | None = None, spare=None) -> Encoded:
        """This rank's payload for its flat tensor at step ``key.step``.

        ``measure`` also returns the compression error of the vector compressed, relative
        and absolute (two extra passes over it). When ranks agree on k (``dynamic:agree=true``),
        ``gather(row)`` is the frontend's allgather of a float64 row over the ranks (numpy
        eagerly, tensors inside a graph), which :meth:`Dynamic.agree_k` runs twice before
        the payload is formed (every rank must encode this tensor at this point of its
        step). ``dense`` says whether this
        is a warm-up step where ``key.step`` is a graph tensor (inside ``tf.function`` the
        frontend branches on the step and traces both phases). ``level``: the compressor
        ``auto`` planned for this tensor, in place of the spec's (see
        :meth:`hvd_compress.core.auto.Auto.route`). ``model_size``: the entries of the
        whole model, which ``perturb`` spreads its noise over (required with it).
        ``owned``, ``undo`` and ``spare``: see :meth:`Feedback.encode`."""
        codec = self.codec(key.step) if dense is None else \
            (self._dense if dense else self.compressor)
        used, error = [codec], [None]

        def choose(v):
            if self.policy is not None and codec is self.compressor:
                if self.policy.agree:
                    if gather is None:
                        raise HvdCompressError(
                            f"{self.spec()}: agree=true needs the ranks' allgather "
                            "(encode(..., gather=...))")
                    k = self.policy.agree_k(bk, v, gather)
                    used[0] = self.policy.codec(k, self.compressor, fixed=True)
                else:
                    used[0] = level if level is not None else \
                        self.policy.choose(bk, v, self.compressor)
            return used[0]

        def compress(v):
            c = choose(v)
            p = c.compress(v, key)
            sent = Sent(bk, c, p)
            if measure:
                error[0] = _errors(bk, v, sent.subtract_from(v))
            return p, sent

        if self.perturbation is not None:
            if not model_size:
                raise HvdCompressError(
                    f"{self.spec()}: perturb spreads its noise over the whole model, so it "
                    f"needs the model's size (frontends bound to an optimizer or tape know "
                    f"it; pass model_size= to SparseAllreduce, Exchange or Workers)")
            flat = self.perturbation.apply(bk, flat, key, model_size)
        if self.feedback is not None:
            payload, state = self.feedback.encode(compress, bk, flat, state, owned, undo,
                                                  spare)
        elif measure:
            payload, _ = compress(flat)
        else:  # nothing needs the dense view: skip decoding
            payload = choose(flat).compress(flat, key)
        return Encoded(payload, used[0], state, error[0])

    def decode(self, bk, mean, state, owned: bool = False):
        """(update, state) from the average over ranks of the decompressed payloads;
        ``owned``: the mean is the caller's, and the update may take its memory."""
        if self.feedback is None:
            return mean, state
        return self.feedback.decode(bk, mean, state, owned=True) if owned else \
            self.feedback.decode(bk, mean, state)


class Sent(NamedTuple):
    """What a payload stands for, applied without decoding it to a dense tensor where
    the codec can (sparse payloads touch only their entries): what the feedback rules
    move their residuals and estimates by."""
    bk: Backend
    codec: Compressor
    payload: Payload

    def subtract_from(self, v, owned: bool = False):
        """``v - C(v)``; ``owned``: v is a fresh tensor that may be overwritten."""
        return self.codec.add_sent(self.bk, v, self.payload, -1.0, owned)

    def add_to(self, x, scale: float = 1.0, owned: bool = False):
        """``x + scale * C(v)``."""
        return self.codec.add_sent(self.bk, x, self.payload, scale, owned)

    def move(self, x, undo: list | None, scale: float = 1.0):
        """``x + scale * C(v)`` for a state tensor x: in x's memory where ``undo`` is a
        list, the payload sparse and the tensors mutable (the k entries it overwrites go
        into ``undo`` first, so a void step can put them back exactly); else a fresh
        tensor, and x stays as it was."""
        at = self.codec.touched(self.payload) if self.bk.mutable else None
        if undo is None or at is None:
            return self.add_to(x, scale)
        undo.append(Undo(x, at, self.bk.gather(x, at)))
        return self.add_to(x, scale, owned=True)


class Undo(NamedTuple):
    """Entries of a state tensor that a step overwrote in place: ``put_back`` restores
    them where the step turns out void."""
    tensor: Any
    positions: Any
    values: Any

    @staticmethod
    def put_back(bk, undo):
        for u in reversed(undo):
            bk.put_(u.tensor, u.positions, u.values)


def _errors(bk, v, residual):
    """(||residual||^2 / ||v||^2, ||residual||^2): the relative and absolute error."""
    diff = bk.astype(residual, "float64")
    num = bk.sum(diff * diff)
    v = bk.astype(v, "float64")
    den = bk.sum(v * v)
    if not bk.eager():  # graph tensors, read when the step runs
        return bk.where(den > 0, num / bk.where(den > 0, den, den + 1.0), num * 0.0), num
    num, den = float(num), float(den)
    return (num / den if den > 0 else 0.0), num


def resolve_pipeline(obj) -> Pipeline:
    """A Pipeline from a spec string, a compressor or a pipeline.

    ``"topk:0.01+ef21sgdm:eta=0.1+dynamic:cost=affine+warmup:100"``: compressor first,
    then at most one feedback rule, one policy, one ``perturb`` and ``warmup:STEPS``.
    ``"auto"`` alone stands for ``"topk:0.01+ef14+auto"``.
    """
    if isinstance(obj, Pipeline):
        return obj
    if isinstance(obj, Feedback):
        raise HvdCompressError(f"{obj.spec()} is a feedback rule; put a compressor first, "
                               f"e.g. 'topk:0.01+{obj.spec()}'")
    if isinstance(obj, Compressor):
        return Pipeline(obj)
    if not isinstance(obj, str):
        raise HvdCompressError(
            f"expected a spec string, a Compressor or a Pipeline, got {type(obj).__name__}")
    stages = parse(obj)
    if stages[0][0] == "auto":  # shorthand: the least k and the feedback auto plans with
        stages = parse("topk:0.01+ef14") + stages
    name, args, kwargs = stages[0]
    compressor = build(name, args, kwargs, ("compressor",), obj)
    found = {"feedback": None, "policy": None, "perturbation": None}
    dense_steps = 0
    for name, args, kwargs in stages[1:]:
        if name == "warmup":
            if len(args) != 1 or kwargs:
                raise HvdCompressError(f"spec {obj!r}: warmup takes one value, the step count")
            if [stage[0] for stage in stages].count("warmup") > 1:
                raise HvdCompressError(f"spec {obj!r}: at most one warmup per pipeline")
            dense_steps = args[0]
            continue
        kind, _ = lookup(name, ("feedback", "policy", "perturbation"))
        if found[kind] is not None:
            raise HvdCompressError(f"spec {obj!r}: at most one {kind} per pipeline")
        found[kind] = build(name, args, kwargs, (kind,), obj)
    return Pipeline(compressor, found["feedback"], found["policy"], dense_steps,
                    found["perturbation"])


def resolve(obj):
    """A compressor for a one-stage spec, a Pipeline when feedback or warm-up is given;
    objects are returned as they are."""
    if isinstance(obj, (Compressor, Pipeline)):
        return obj
    if isinstance(obj, str) and len(parse(obj)) == 1:
        return resolve_compressor(obj)
    return resolve_pipeline(obj)
