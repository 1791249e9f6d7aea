"""The API reference is generated from the docstrings (``make docs``): every module gets
a page and the algorithms' docstrings reach it."""
from hvd_compress.apidoc import modules, write


def test_every_module_has_a_page_with_its_docstrings(tmp_path):
    names = write(str(tmp_path))
    assert {"hvd_compress.core.policy", "hvd_compress.torch.compression",
            "hvd_compress.tensorflow.compression", "hvd_compress.comm.mpi"} <= set(names)
    for name in names:
        assert (tmp_path / (name.replace(".", "/") + ".html")).exists(), name
    policy = (tmp_path / "hvd_compress/core/policy.html").read_text()
    assert "agree_k" in policy and "Khirirat" in policy
    assert names == modules()
