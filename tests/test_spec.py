"""Spec strings and objects are interchangeable; every mistake names itself."""
import pytest

import hvd_compress as hc
from hvd_compress import HvdCompressError
from hvd_compress.core.quantizers import QSGD
from hvd_compress.core.sparsifiers import RandK, TopK


@pytest.mark.parametrize("spec, obj", [
    ("topk:0.01", TopK(0.01)),
    ("topk", TopK()),
    ("topk:k=5", TopK(k=5)),
    ("randk:0.1,scaled=true", RandK(0.1, scaled=True)),
    ("randk:ratio=0.1,shared=true,seed=3", RandK(0.1, shared=True, seed=3)),
    ("qsgd:s=15,bucket=128", QSGD(15, 128)),
    ("QSGD: 15 , 128", QSGD(15, 128)),
])
def test_spec_builds_the_object(spec, obj):
    assert hc.resolve(spec) == obj
    assert hc.resolve(obj) is obj
    assert hc.resolve(obj.spec()) == obj  # canonical string round-trips


def test_canonical_spec_strings():
    assert TopK(0.05).spec() == "topk:ratio=0.05"
    assert TopK().spec() == "topk"
    assert RandK(0.1, scaled=True).spec() == "randk:ratio=0.1,scaled=true"


@pytest.mark.parametrize("spec, message", [
    ("", "empty compression spec"),
    ("zipk:0.1", "unknown algorithm 'zipk'"),
    ("topk:ratio=2", "ratio=2 must lie in (0, 1]"),
    ("topk:ratio=0", "ratio=0 must lie in (0, 1]"),
    ("topk:k=0", "k=0 must be a positive integer"),
    ("topk:kk=3", "topk has no parameter 'kk'"),
    ("topk:0.1,0.2,3,4,5", "at most 4 positional arguments"),
    ("topk:ratio=0.1,0.2", "positional argument '0.2' after keyword"),
    ("topk:ratio=0.1,ratio=0.2", "argument 'ratio' given twice"),
    ("qsgd:s=0", "s=0 must be an integer in [1, 32767]"),
    ("qsgd:bucket=0", "bucket=0 must be a positive integer"),
    ("threshold:lam=-1", "lam=-1 must be positive"),
    ("topk:values=int8", "values='int8' must be one of"),
    ("topk:0.1,", "empty argument"),
    ("top k", "bad algorithm name"),
    # feedback rules refuse compressors their guarantee does not cover
    ("topk:0.1+diana", "diana needs an unbiased compressor, but topk:ratio=0.1 is contractive"),
    ("randk:0.1,scaled=true+ef21", "ef21 needs a contractive compressor"),
    ("threshold:lam=1+ef21", "is absolute"),
    ("qsgd+ef14", "ef14 needs a contractive or absolute compressor"),
    ("topk+ef21+ef14", "at most one feedback per pipeline"),
    ("topk+ef21sgdm:eta=0", "eta=0 must lie in (0, 1]"),
    ("topk+ef21sgdm:eta=1.5", "eta=1.5 must lie in (0, 1]"),
    ("topk+warmup:-1", "dense_steps=-1"),
    ("topk+topk", "unknown algorithm 'topk'"),
    ("ef21", "unknown algorithm 'ef21'"),
    # policies
    ("sign+dynamic", "dynamic chooses k for topk, the budget for bernoulli and s for qsgd"),
    ("topk+dynamic:cost=cubic", "cost='cubic' must be one of"),
    ("topk+dynamic:kmin=0", "need 1 <= kmin <= kmax"),
    ("topk+dynamic:cost=packet,packet=100,header=80", "cannot hold one 64-bit entry"),
    ("topk+dynamic+dynamic", "at most one policy"),
])
def test_bad_specs_raise_one_error_type(spec, message):
    with pytest.raises(HvdCompressError) as e:
        hc.resolve(spec)
    assert message in str(e.value)


def test_resolve_rejects_other_objects():
    with pytest.raises(HvdCompressError,
                       match="expected a spec string, a Compressor or a Pipeline"):
        hc.resolve(42)
