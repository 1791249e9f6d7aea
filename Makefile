# The two commands the README opens with: `make demo` and `make test`.
# Each runs scripts/setup.sh first (idempotent: seconds once the stack is installed).
VENV   ?= $(or $(HVD_COMPRESS_VENV),.venv)
PY     := $(VENV)/bin/python
NP     ?= 4
ROOT   := $(if $(filter 0,$(shell id -u)),--allow-run-as-root,)
MPIRUN := mpirun $(ROOT) --oversubscribe --bind-to none -x OMP_NUM_THREADS=1 -np $(NP)

.PHONY: setup demo demo-tf test bench bench-link experiments docs

setup:
	@bash scripts/setup.sh

demo: setup
	$(MPIRUN) $(PY) examples/torch_a9a.py

demo-tf: setup
	$(MPIRUN) $(PY) examples/tf_a9a.py --keras 3

test: setup
	$(PY) -m pytest tests -ra

bench: setup
	$(PY) benchmarks/compressors.py

# step times on real links shaped with tc in network namespaces (needs root; it says so)
bench-link: setup
	$(PY) benchmarks/link.py --write-docs

experiments: setup
	$(PY) experiments/seeds.py --out docs/img

# the API reference, generated from the docstrings into build/api (tests/test_docs.py
# builds it too, so it cannot rot)
docs: setup
	$(PY) -m hvd_compress.apidoc build/api
