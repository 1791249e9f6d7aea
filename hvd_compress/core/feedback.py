"""Error feedback and shift rules: what keeps accuracy under aggressive compression.

Every rule is state-as-data: ``init(bk, x) -> state`` makes a NamedTuple of flat tensors,
``encode(compress, bk, g, state) -> (payload, state)`` runs on each worker and produces
the payload to send, and ``decode(bk, mean, state) -> (update, state)`` turns the average
over ranks of the decompressed payloads into the gradient estimate to apply. Each rank
keeps its own copy of the aggregate part of the state; because every rank decodes the same
bits in the same order, the copies stay identical.

``compress(vector) -> (payload, sent)`` is handed in by the pipeline: it applies the
compressor (at the level a policy chose) and also returns what the payload stands for as
a :class:`~hvd_compress.core.pipeline.Sent`, which moves the rules' residuals and running
estimates by the sent vector without decoding it densely (a sparse payload touches only
its k entries).

``decode`` returns an update that shares no memory with the state: frameworks hand it to
the user as the gradient, which may be clipped or zeroed in place. ``decode(...,
owned=True)`` says the mean is the caller's own tensor, which the update may overwrite
(one tensor of the model's size fewer per step).

Memory: a tensor of the model's size that a step writes fresh costs more than a pass over
one already mapped (on a CPU the kernel maps and zeroes its pages), so the rules reuse
what they may. ``encode(..., owned=True)`` says g is the caller's own tensor, which the
rule may use as scratch (the difference it compresses goes there). ``encode(...,
undo=[])`` lets the rule move its running estimates by a sparse payload in their own
memory, listing the k entries it overwrote (:class:`~hvd_compress.core.pipeline.Undo`),
so a step every rank voids (a NaN somewhere) leaves the state exactly as it was.
``encode(..., spare=state)`` hands the rule a state of its own that no one holds any
more (what the last valid step replaced, where the backend
:meth:`~hvd_compress.core.ops.Backend.keeps_memory`): the tensors the rule writes anew
each step (EF14's residual, the momenta) go into its memory, so two copies alternate
instead of a fresh tensor per step.
``decode`` consumes the state it is given: on numpy and torch it may update the
aggregate in place (it runs once every rank's payload is known to be valid).

Which compressor classes a rule accepts is part of its guarantee: EF14 and the EF21
family need contractive (or absolute, for EF14) compressors, DIANA unbiased ones.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from ..errors import HvdCompressError
from .algorithm import Algorithm
from .compressor import check_float
from .registry import register


class Feedback(Algorithm):
    kind = "feedback"
    accepts: tuple = ()
    renews: tuple[str, ...] = ()  # the state's fields each step writes anew (in ``spare``)

    def check(self, compressor):
        """Refuse compressors whose class this rule's guarantee does not cover."""
        if compressor.bias not in self.accepts + ("exact",):
            kinds = " or ".join(self.accepts)
            raise HvdCompressError(
                f"{self.name} needs {'an' if kinds[0] in 'aeiou' else 'a'} {kinds} compressor, "
                f"but {compressor.spec()} is {compressor.bias}. {self.hint}")

    hint = ""

    def init(self, bk, x, compressor):
        """Fresh state for the flat tensor x (compressor: the one this rule wraps)."""
        raise NotImplementedError

    def encode(self, compress, bk, g, state, owned: bool = False, undo: list | None = None,
               spare=None):
        """(payload, state) for this rank's flat gradient g (see the module's docstring
        for ``owned``, ``undo`` and ``spare``)."""
        raise NotImplementedError

    def decode(self, bk, mean, state, owned: bool = False):
        raise NotImplementedError


def _zeros(bk, x):
    return bk.zeros(bk.size(x), bk.dtype(x), x)


def _memory(bk, spare, field: str, like):
    """The spare state's ``field`` where its memory fits a tensor like ``like``, else
    None (a new tensor)."""
    t = None if spare is None else getattr(spare, field)
    return t if t is not None and bk.size(t) == bk.size(like) and \
        bk.dtype(t) == bk.dtype(like) else None


class EF14State(NamedTuple):
    residual: Any         # e_i: what was not sent yet


@register("feedback", "ef14")
class EF14(Feedback):
    """EF14, classic error feedback (Seide et al. 2014; Stich et al. 2018; Karimireddy et
    al. 2019): send C(e + g), keep the rest, e <- (e + g) - C(e + g).

    Nothing is lost: over steps every coordinate is eventually sent. The update applied is
    the average of what the ranks sent. Works with any contractive compressor and with hard
    threshold (Sahu et al. 2021). Memory: one tensor per parameter (on a CPU a second
    one is kept between steps, for the next residual: see the module's ``spare``).
    """
    accepts = ("contractive", "absolute")
    hint = "Use an unscaled compressor (e.g. randk without scaled=true), or diana."
    renews: tuple[str, ...] = ("residual",)

    def __init__(self):
        pass

    def init(self, bk, x, compressor):
        return EF14State(_zeros(bk, x))

    def encode(self, compress, bk, g, state, owned=False, undo=None, spare=None):
        # the new residual is another tensor: the old one stays until the step is valid
        p = bk.into(_memory(bk, spare, "residual", state.residual), "add", state.residual, g)
        payload, sent = compress(p)
        return payload, EF14State(sent.subtract_from(p, owned=True))

    def decode(self, bk, mean, state, owned=False):
        return mean, state

    def absorb(self, bk, state, positions, values):
        """The state with ``values`` added to the residual at ``positions``: entries of
        the ranks' payloads that a merge on this rank dropped (see
        :mod:`hvd_compress.core.gtopk`)."""
        residual = state.residual  # made by this step's encode: no one else holds it
        return EF14State(bk.scatter_add_into(residual, positions,
                                             bk.astype(values, bk.dtype(residual))))


class EF21State(NamedTuple):
    local: Any            # g_i: this rank's running estimate of its gradient
    aggregate: Any        # g = mean_i g_i, identical on every rank


@register("feedback", "ef21")
class EF21(Feedback):
    """EF21 (Richtarik, Sokolov, Fatkhullin, NeurIPS 2021): each rank keeps an estimate g_i
    of its gradient and sends only the compressed correction c_i = C(grad - g_i); every
    rank updates g <- g + mean_i c_i and applies g.

    Needs full (or large-batch) gradients to converge; with small batches prefer
    ef21sgdm. Memory: two tensors per parameter.
    """
    accepts = ("contractive",)
    hint = "Use an unscaled compressor (e.g. topk, or randk without scaled=true), or diana."

    def __init__(self):
        pass

    def init(self, bk, x, compressor):
        return EF21State(_zeros(bk, x), _zeros(bk, x))

    def _correct(self, compress, bk, target, local, scratch, undo):
        """Send C(target - local), the difference written in ``scratch`` (the caller's
        gradient) where it is not None; local moves by what was sent."""
        diff = bk.into(scratch, "sub", target, local)
        payload, sent = compress(diff)
        return payload, sent.move(local, undo)

    def encode(self, compress, bk, g, state, owned=False, undo=None, spare=None):
        payload, local = self._correct(compress, bk, g, state.local, g if owned else None,
                                       undo)
        return payload, state._replace(local=local)

    def decode(self, bk, mean, state, owned=False):
        agg = bk.add_(state.aggregate, mean)
        return bk.overwrite(mean, agg) if owned else bk.copy(agg), \
            state._replace(aggregate=agg)


class EF21SGDMState(NamedTuple):
    momentum: Any         # v_i = (1 - eta) v_i + eta grad (never sent)
    local: Any
    aggregate: Any
    count: Any            # steps taken: an int, or a tensor where TF keeps state in variables


@register("feedback", "ef21sgdm")
class EF21SGDM(EF21):
    """EF21-SGDM (Fatkhullin, Tyurin, Richtarik, "Momentum Provably Improves Error
    Feedback!", NeurIPS 2023): EF21 applied to a local momentum v_i <- (1-eta) v_i + eta
    grad_i, which removes EF21's need for large batches.

    Args:
      eta: momentum weight in (0, 1]; eta = 1 is EF21 on stochastic gradients. Smaller eta
        averages more noise away; 0.1 is a robust default, 0.01 for very noisy gradients.
        The first step takes v_i = grad_i.

    Since v_i already averages gradients, lower the optimizer's own momentum (or use plain
    SGD) when enabling it. Memory: three tensors per parameter (on a CPU a fourth is
    kept between steps, for the next momentum).
    """

    renews: tuple[str, ...] = ("momentum",)

    def __init__(self, eta=0.1):
        self.eta = check_float(self.name, "eta", eta, high=1.0)

    def init(self, bk, x, compressor):
        return EF21SGDMState(_zeros(bk, x), _zeros(bk, x), _zeros(bk, x), 0)

    def _momentum(self, bk, v, g, count, owned=False, memory=None):
        """(1 - eta) v + eta g, written in ``memory`` where it is not None, and in g's
        where g is ``owned`` (the caller's own tensor)."""
        if isinstance(count, int):
            # a copy at the first step: the state must not share memory with the caller's
            # gradient, which frameworks and users reuse
            if count == 0:
                return bk.copy(g) if memory is None else bk.cast_into(memory, g, bk.dtype(g))
            # the sum in the first product's memory, the second in g's where it is ours
            # (else in scratch): the same roundings, no tensor of the model's size fresh
            kept = bk.into(memory, "mul", v, 1.0 - self.eta)
            term = g if owned else bk.scratch("feedback.momentum", bk.size(g), bk.dtype(g), g)
            new = bk.into(term, "mul", g, self.eta)
            return bk.add_(kept, new) if bk.dtype(kept) == bk.dtype(new) else kept + new
        # a step-count tensor inside a graph: the same coefficients, chosen arithmetically
        first = bk.astype(count == 0, bk.dtype(g))
        return v * ((1.0 - self.eta) * (1.0 - first)) + g * (self.eta + (1.0 - self.eta) * first)

    def encode(self, compress, bk, g, state, owned=False, undo=None, spare=None):
        v = self._momentum(bk, state.momentum, g, state.count, owned,
                           _memory(bk, spare, "momentum", state.momentum))
        payload, local = self._correct(compress, bk, v, state.local, g if owned else None,
                                       undo)
        return payload, state._replace(momentum=v, local=local, count=state.count + 1)


class EF21SGD2MState(NamedTuple):
    momentum: Any
    momentum2: Any        # u_i = (1 - eta) u_i + eta v_i
    local: Any
    aggregate: Any
    count: Any            # steps taken: an int, or a tensor where TF keeps state in variables


@register("feedback", "ef21sgd2m")
class EF21SGD2M(EF21SGDM):
    """EF21-SGD2M, the double-momentum variant of EF21-SGDM (same paper): a second moving
    average u_i of v_i is what g_i tracks. Improves the compression-dependent term of the
    rate; same knob eta. Memory: four tensors per parameter (on a CPU two more are kept
    between steps, for the next momenta)."""

    renews = ("momentum", "momentum2")

    def init(self, bk, x, compressor):
        return EF21SGD2MState(*[_zeros(bk, x) for _ in range(4)], 0)

    def encode(self, compress, bk, g, state, owned=False, undo=None, spare=None):
        v = self._momentum(bk, state.momentum, g, state.count, owned,
                           _memory(bk, spare, "momentum", state.momentum))
        u = self._momentum(bk, state.momentum2, v, state.count,
                           memory=_memory(bk, spare, "momentum2", state.momentum2))
        payload, local = self._correct(compress, bk, u, state.local, g if owned else None,
                                       undo)
        return payload, state._replace(momentum=v, momentum2=u, local=local,
                                       count=state.count + 1)


class DIANAState(NamedTuple):
    shift: Any            # h_i: this rank's learned shift
    aggregate: Any        # h = mean_i h_i, identical on every rank
    alpha: float


@register("feedback", "diana")
class DIANA(Feedback):
    """DIANA (Mishchenko, Gorbunov, Takac, Richtarik 2019): compress the difference to a
    learned shift, m_i = C(grad - h_i); apply h + mean_i m_i, and move the shifts
    h_i <- h_i + alpha m_i toward the local gradients. With unbiased compressors the
    variance vanishes as the shifts converge, even with heterogeneous data.

    Args:
      alpha: shift step in (0, 1]; default 1 / (1 + omega) of the compressor, the largest
        the theory allows.
    """
    accepts = ("unbiased",)
    hint = "Use an unbiased compressor (randk with scaled=true, qsgd, terngrad, natural)."

    def __init__(self, alpha=None):
        self.alpha = None if alpha is None else check_float("diana", "alpha", alpha, high=1.0)

    def init(self, bk, x, compressor):
        alpha = self.alpha
        if alpha is None:
            alpha = 1.0 / (1.0 + compressor.omega(bk.size(x))) if compressor.bias == "unbiased" \
                else 1.0
        return DIANAState(_zeros(bk, x), _zeros(bk, x), alpha)

    def encode(self, compress, bk, g, state, owned=False, undo=None, spare=None):
        diff = bk.into(g if owned else None, "sub", g, state.shift)
        payload, sent = compress(diff)
        return payload, state._replace(shift=sent.move(state.shift, undo, state.alpha))

    def decode(self, bk, mean, state, owned=False):
        moved = mean * state.alpha
        update = bk.add_(mean, state.aggregate) if owned else state.aggregate + mean
        return update, state._replace(aggregate=bk.add_(state.aggregate, moved))
