"""Bad input stops at the constructor, by name; good input survives its canonical spec.

Every refusal is an HvdCompressError naming the field (never a TypeError from deep inside
torch at step 1, never a value quietly read as something else: ``True`` as 1, ``inf`` as a
threshold nothing passes). Every spec that resolves writes a canonical string that
resolves to an equal object, with the same types (ints stay ints).
"""
import inspect

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hvd_compress as hc
from hvd_compress import HvdCompressError
from hvd_compress.core.feedback import EF14
from hvd_compress.core.perturbation import Perturb
from hvd_compress.core.pipeline import Pipeline, resolve_pipeline
from hvd_compress.core.policy import Dynamic
from hvd_compress.core.registry import lookup
from hvd_compress.core.sparsifiers import RandK, Threshold, TopK


@pytest.mark.parametrize("spec, message", [
    # words, bools, none, nan and inf where a number belongs
    ("randk:abc", "randk: ratio='abc' must be a number"),
    ("topk:True", "ratio=True must be a number"),
    ("topk:ratio=none", "ratio=None must be a number"),
    ("topk:ratio=nan", "ratio=nan must be finite"),
    ("bernoulli:1e-400", "ratio=0.0 must lie in (0, 1]"),       # underflows to 0
    ("threshold:inf", "lam=inf must be finite"),
    ("threshold:lam=1_000", "lam='1_000' must be a number"),    # ASCII decimals only
    ("topk+ef21sgdm:eta=nan", "eta=nan must be finite"),
    ("topk+ef21sgd2m:eta=true", "eta=True must be a number"),
    ("qsgd+diana:alpha=2", "diana: alpha=2 must lie in (0, 1]"),
    ("topk+perturb:radius=inf", "radius=inf must be finite"),
    ("topk+perturb:radius=0", "radius=0 must be positive"),
    ("topk+dynamic:c0=-1", "c0=-1 must be >= 0"),
    ("topk+dynamic:b=0", "b=0 must be positive"),
    ("topk+dynamic:alpha=nan", "alpha=nan must be finite"),
    ("topk+dynamic:beta=0", "beta=0 must be positive"),
    # integers: no fractions, bools, words or inf
    ("topk:k=2.5", "topk: k=2.5 must be a positive integer"),
    ("topk:k=true", "k=True must be a positive integer"),
    ("topk:k=10**12", "k='10**12' must be a positive integer"),
    ("randk:k=0x10", "k='0x10' must be a positive integer"),
    ("topk:k=1e400", "k=inf must be a positive integer"),
    ("topk:k=", "k='' must be a positive integer"),
    ("qsgd:s=nan", "s=nan must be an integer in [1, 32767]"),
    ("qsgd:s=32768", "s=32768 must be an integer in [1, 32767]"),
    ("qsgd:bucket=2.5", "bucket=2.5 must be a positive integer"),
    ("qsgd:seed=abc", "qsgd: seed='abc' must be an integer"),
    ("terngrad:0.5", "terngrad: seed=0.5 must be an integer"),
    ("natural:seed=false", "natural: seed=False must be an integer"),
    ("topk+dynamic:n=1", "n=1 must be an integer >= 2"),
    ("topk+dynamic:packet=1.5", "packet=1.5 must be a positive integer"),
    ("topk+dynamic:header=-1", "header=-1 must be an integer >= 0"),
    ("topk+dynamic:kmin=2.5", "kmin=2.5 must be an integer"),
    ("topk+dynamic:kmax=abc", "kmax='abc' must be an integer >= 0"),
    ("topk+warmup:abc", "warmup: dense_steps='abc' must be an integer >= 0"),
    ("topk+warmup:2.5", "dense_steps=2.5 must be an integer >= 0"),
    ("topk+warmup:true", "dense_steps=True must be an integer >= 0"),
    # flags are true or false, not truthy
    ("randk:scaled=1", "scaled=1 must be true or false"),
    ("randk:shared=yes", "shared='yes' must be true or false"),
    ("topk+dynamic:agree=0", "agree=0 must be true or false"),
    # the shape of the spec
    ("topk:0.1,ratio=0.2", "topk got ratio twice, as the positional argument 0.1 and as ratio=0.2"),
    ("qsgd:7,3,s=3", "qsgd got s twice"),
    ("topk+dynamic:c0=1e+20", "write the exponent '1e+20' without it"),
    ("topk+warmup:1+warmup:2", "at most one warmup per pipeline"),
    ("topk+warmup:steps=3", "warmup takes one value, the step count"),
])
def test_bad_input_is_refused_by_name(spec, message):
    with pytest.raises(HvdCompressError) as e:
        hc.resolve(spec)
    assert message in str(e.value)


def _fields(obj):
    """Every stage's type and parameters, with each value's type: what must round-trip."""
    stages = [obj] if not isinstance(obj, Pipeline) else \
        [obj.compressor, obj.feedback, obj.policy, obj.perturbation, obj.dense_steps]
    return [(type(s).__name__, [(k, type(v), v) for k, v in s.params().items()])
            if hasattr(s, "params") else s for s in stages]


def _assert_round_trips(obj):
    reread = resolve_pipeline if isinstance(obj, Pipeline) else hc.resolve
    assert _fields(reread(obj.spec())) == _fields(obj), obj.spec()


def _often(likely, rarely):
    """``likely`` about four times in five, else ``rarely``."""
    return st.integers(0, 4).flatmap(lambda i: likely if i else rarely)


def _params(name):
    return [p for p in inspect.signature(lookup(name)[1].__init__).parameters if p != "self"]


_COMPRESSORS = hc.available("compressor")
_NAMES = hc.available() + ["warmup"]
_PARAMS = sorted({p for n in hc.available() for p in _params(n)} | {"steps"})
_GOOD = st.one_of(  # values that some parameter accepts, written as the spec writer would
    st.sampled_from(["true", "false", "none", "float16", "varint", "affine", "packet"]),
    st.integers(0, 600).map(str),
    st.floats(0, 1).map(repr), st.floats(0, allow_infinity=False).map(repr),
    ).map(lambda v: v.replace("e+", "e"))
_BAD = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "abc", "10**12", "1_000", "0x10", "", " ", "1e400",
                     "1e-400", "1e+20", "-1", "2.5", "allgather", "linear"]),
    st.integers(-2 ** 70, 2 ** 70).map(str), st.floats().map(repr),
    st.text("0123456789.-e+,=:ab ", max_size=6))
_VALUES = _often(_GOOD, _BAD)


def _stage(name):
    """``name`` with a few arguments, keyed mostly by its own parameters."""
    if name == "warmup":
        return _VALUES.map("warmup:{}".format)
    own = _params(name)
    key = _often(st.sampled_from(own), st.sampled_from(_PARAMS)) if own else \
        st.sampled_from(_PARAMS)
    arg = _often(st.builds("{}={}".format, key, _VALUES), _VALUES)
    args = st.lists(arg, max_size=len(own)) if own else _often(st.just([]), st.lists(arg))
    return args.map(lambda a: name + (":" + ",".join(a) if a else ""))


# mostly a compressor first, then feedback, policy, perturbation or warm-up stages
_FIRST = _often(st.sampled_from(_COMPRESSORS), st.sampled_from(_NAMES)).flatmap(_stage)
_LATER = st.sampled_from([n for n in _NAMES if n not in _COMPRESSORS]).flatmap(_stage)
_SPECS = st.builds(lambda first, later: "+".join([first] + later), _FIRST,
                   st.lists(_LATER, max_size=2))


@settings(max_examples=300, deadline=None)
@given(_SPECS)
def test_fuzzed_specs_resolve_and_round_trip_or_raise_our_error(spec):
    try:
        obj = hc.resolve(spec)
    except HvdCompressError:
        return
    _assert_round_trips(obj)


@pytest.mark.parametrize("x", [1e16, 1e20, 1.7976931348623157e308, 0.1 + 0.2, 1e-20, 5e-324,
                               2.0 ** 60 + 2.0 ** 8, 123456789.0])
def test_huge_and_tiny_floats_round_trip(x):
    """repr(1e20) is '1e+20', whose '+' would split the spec: the writer drops it."""
    _assert_round_trips(Pipeline(Threshold(x), EF14(), perturbation=Perturb(x), dense_steps=3))
    _assert_round_trips(Pipeline(TopK(min(x, 1.0)),
                                 policy=Dynamic(c0=x, b=x, beta=x, kmax=10 ** 20)))
    _assert_round_trips(RandK(min(x, 1.0), seed=-2 ** 70))
    # numpy scalars are stored as the Python numbers the spec writes back
    _assert_round_trips(TopK(np.float32(0.1), k=np.int64(7)))
