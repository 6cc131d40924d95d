#!/usr/bin/env bash
# Create the virtual environment and install the pinned, tested stack
# (requirements/constraints.txt). Run by `make install`; the variables below can be given to
# either (`make install PYTHON=/usr/bin/python3`, `VENV=... bash tools/install.sh`).
#
#   PYTHON      interpreter the venv is made from (default python3). If it already imports a
#               torch (a CUDA build from the cluster image, say), that torch is kept: the venv
#               is made with --system-site-packages (and, when PYTHON is itself a venv, a .pth
#               file points at its site-packages). Nothing replaces an existing torch.
#   VENV        the environment to install into (default .venv). An existing one is used as
#               it is: point VENV at a venv or conda env that has your torch to install there.
#   WHEELHOUSE  a folder from `make wheelhouse`: install offline from it (pip --no-index).
#               It holds no torch: the Python must already have one (or the folder a torch
#               wheel, or your pip config a --find-links that has one).
#   MMCV_CUDA   auto (default): build mmcv's CUDA ops when torch sees a GPU; 1: always (set
#               TORCH_CUDA_ARCH_LIST on a node without GPU); 0: CPU ops only.
#   TORCH_CUDA_ARCH_LIST  GPU architectures for mmcv's CUDA ops (default: the local GPUs').
#   MAX_JOBS    parallel compile jobs (default: the number of cores).
#   WITH_TRITON 1 (default): next to a CPU torch, install the pinned triton, whose
#               interpreter runs the CUDA kernels' tests on CPU in `make test` (about 1 GB);
#               0: skip it (those tests then skip). A CUDA torch's own triton is kept.
#
# Idempotent: steps whose result is already present are skipped. pip's wheel cache keeps the
# CPU build of mmcv, so a second run on the same machine takes seconds; a CUDA build is kept
# as a wheel in MMCV_WHEEL_DIR (default ~/.cache/mmdet_anchorloss/<torch, archs>).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-}
CONSTRAINTS=requirements/constraints.txt
pin() { grep -E "^$1==" "$CONSTRAINTS" | head -n 1; }
START=$SECONDS

step=""
trap 'echo "[install] FAILED at step: ${step}. See the output above." >&2' ERR
say() { step="$1"; echo "[install] [$((SECONDS - START)) s] $1"; }
die() { echo "[install] ERROR: $*" >&2; exit 1; }

SRC=()
if [ -n "$WHEELHOUSE" ]; then
  [ -d "$WHEELHOUSE" ] || die "WHEELHOUSE=$WHEELHOUSE is not a folder"
  WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
  SRC=(--no-index --find-links "$WHEELHOUSE")
  echo "[install] offline: installing from the wheelhouse $WHEELHOUSE (pip --no-index)"
fi

# pip install with the package source (index or wheelhouse); on failure, name the packages
# pip found no file for.
pip_install() {
  local log rc=0
  log=$(mktemp)
  "$PY" -m pip install --disable-pip-version-check ${SRC[@]+"${SRC[@]}"} "$@" 2>&1 | tee "$log" || rc=$?
  if [ "$rc" -ne 0 ]; then
    local missing
    # torch is never in a wheelhouse: its own message follows
    missing=$(grep -oE 'satisf(y|ies) the requirement [^ ]+' "$log" | awk '{print $NF}' |
      grep -v '^torch\b' | sort -u | tr '\n' ' ' || true)
    if [ -n "$missing" ]; then
      if [ -n "$WHEELHOUSE" ]; then
        echo "[install] ERROR: the wheelhouse $WHEELHOUSE has no usable file for: ${missing}" \
          "(for this Python $("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
          "and platform). Rebuild it with \`make wheelhouse\` on a machine with network access" \
          "(PYTHON_VERSION/PLATFORM of this machine), or add those wheels to it." >&2
      else
        echo "[install] ERROR: pip found no distribution for: ${missing}" >&2
      fi
    fi
  fi
  rm -f "$log"
  return "$rc"
}

say "virtual environment ${VENV}"
if [ -x "${VENV}/bin/python" ]; then
  echo "[install]   ${VENV} exists: used as it is"
elif "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "[install]   $PYTHON has torch $("$PYTHON" -c 'import torch; print(torch.__version__, "(CUDA", torch.version.cuda, end=")")'):" \
    "making ${VENV} with --system-site-packages to keep it"
  "$PYTHON" -m venv --system-site-packages "$VENV"
  if ! "${VENV}/bin/python" -c "import torch" 2>/dev/null; then
    # PYTHON is itself a venv: --system-site-packages sees its base, not it. Add its
    # site-packages after the new venv's own.
    site=$("${VENV}/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    "$PYTHON" -c "import site; print('\n'.join(site.getsitepackages()))" > "$site/_base_env.pth"
    echo "[install]   $PYTHON is a venv: its site-packages are on ${VENV}'s path ($site/_base_env.pth)"
  fi
else
  "$PYTHON" -m venv "$VENV"
fi
PY="${VENV}/bin/python"

if [ -n "$WHEELHOUSE" ]; then
  say "wheelhouse check"
  "$PY" tools/wheelhouse.py check "$WHEELHOUSE" \
    --python-version "$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" ||
    die "the wheelhouse $WHEELHOUSE cannot be used here (see above)"
fi

say "torch (kept if already installed; never replaces a user's CUDA build)"
if "$PY" -c "import torch" 2>/dev/null; then
  echo "[install]   torch $("$PY" -c 'import torch; print(torch.__version__, "at", torch.__file__)') present, kept"
elif ! pip_install "$(pin torch)"; then
  if [ -n "$WHEELHOUSE" ]; then
    die "torch is not installed, and the wheelhouse holds none (on purpose: a CUDA build is" \
      "several GB). Install your torch first (pip install torch-*.whl), or use a Python that" \
      "has one (make install PYTHON=/path/to/python WHEELHOUSE=...); see README, Offline install."
  fi
  die "could not install $(pin torch); install torch yourself first (make install keeps it)"
fi

# mmcv 2.1.0's setup.py needs setuptools<70 (pkg_resources API); torch 2.13 and mmengine
# want setuptools>=77,<82 at run time. Build with the old one, then move to the pinned one.
MMCV_BUILD_SETUPTOOLS="setuptools==69.5.1"

# Which ops mmcv needs here: CUDA ones when torch sees a GPU (unless MMCV_CUDA=0).
say "mmcv 2.1.0 with compiled ops (first build: minutes, estimate below; cached: seconds)"
MMCV_CUDA_WANTED=${MMCV_CUDA:-auto}
TORCH_GPU=$("$PY" -c "import torch; print(int(bool(torch.version.cuda) and torch.cuda.is_available()))")
MMCV_READY=0
why=""
if "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" 2>/dev/null; then
  if [ "$MMCV_CUDA_WANTED" = 0 ] || { [ "$TORCH_GPU" = 0 ] && [ "$MMCV_CUDA_WANTED" = auto ]; }; then
    MMCV_READY=1  # CPU ops are enough
  elif [ "$TORCH_GPU" = 1 ] && why=$("$PY" tools/mmcv_build.py check-ops cuda); then
    MMCV_READY=1  # its ops ran on this GPU
  elif [ "$TORCH_GPU" = 0 ] && why=$("$PY" tools/mmcv_build.py check-ops cuda --no-probe); then
    MMCV_READY=1  # MMCV_CUDA=1 without a GPU: compiled with CUDA is all that can be checked
  else
    echo "[install]   the installed mmcv cannot run on the GPU: $why"
    echo "[install]   rebuilding it with CUDA ops"
  fi
fi
DEVICE=cpu
[ "$TORCH_GPU" = 1 ] && [ "$MMCV_CUDA_WANTED" != 0 ] && DEVICE=cuda

if [ "$MMCV_READY" = 1 ]; then
  echo "[install]   mmcv $("$PY" -c 'import mmcv; print(mmcv.__version__)') with ops present, kept"
else
  say "mmcv 2.1.0 build plan"
  plan=$("$PY" tools/mmcv_build.py plan) || die "cannot build mmcv's CUDA ops here (see above)"
  eval "$plan"
  say "build tools for mmcv (${MMCV_BUILD_SETUPTOOLS}, numpy, ninja)"
  pip_install -q "$MMCV_BUILD_SETUPTOOLS" "$(pin wheel)" "$(pin numpy)" "$(pin ninja)"
  est=$MMCV_BUILD_ESTIMATE_S
  say "mmcv 2.1.0 build from source: ${MMCV_BUILD_WHAT}; expect about $(( (est + 59) / 60 )) min" \
    "(a cached build: seconds)"
  if [ "$MMCV_CUDA" = 1 ]; then
    # pip's wheel cache does not tell a CPU build from a CUDA one: keep CUDA builds apart.
    key=$("$PY" -c "import torch; print(torch.__version__.replace('+', '_'))")-sm${TORCH_CUDA_ARCH_LIST//[^0-9A-Za-z]/_}
    wheels=${MMCV_WHEEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mmdet_anchorloss/mmcv-2.1.0-torch$key}
    if ! ls "$wheels"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
      MMCV_WITH_OPS=1 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" \
        MAX_JOBS="$MAX_JOBS" CUDA_HOME="$CUDA_HOME" \
        "$PY" -m pip wheel --disable-pip-version-check ${SRC[@]+"${SRC[@]}"} --no-deps \
        --no-build-isolation --no-cache-dir -w "$wheels" "$(pin mmcv)"
    else
      echo "[install]   reusing the CUDA build in $wheels"
    fi
    pip_install --no-deps --ignore-installed "$wheels"/mmcv-2.1.0-*.whl
    pip_install "$(pin mmcv)" "$(pin numpy)" "$(pin opencv-python)"
  else
    MMCV_WITH_OPS=1 MAX_JOBS="$MAX_JOBS" pip_install --no-build-isolation \
      "$(pin mmcv)" "$(pin numpy)" "$(pin opencv-python)"
  fi
fi

say "mmengine, mmdet, pinned run-time and dev packages, mmdet_anchorloss (editable)"
pip_install -q -c "$CONSTRAINTS" "$(pin setuptools)" "$(pin mmengine)" "$(pin mmdet)" \
  "$(pin pycocotools)" "$(pin matplotlib)" "$(pin scipy)" "$(pin shapely)" \
  "$(pin terminaltables)" "$(pin tqdm)" "$(pin pytest)" "$(pin ruff)"
pip_install -q --no-build-isolation --no-deps -e ".[dev]"

say "triton for the CUDA kernels' tests on CPU (Triton's interpreter)"
if "$PY" -c "import triton" 2>/dev/null; then
  echo "[install]   triton $("$PY" -c 'import triton; print(triton.__version__)') present, kept"
elif [ "${WITH_TRITON:-1}" = 0 ]; then
  echo "[install]   skipped (WITH_TRITON=0): the Triton kernel tests will skip"
elif "$PY" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then
  echo "[install]   this CUDA torch has no triton: left so (one of another version could" \
    "break torch.compile); the Triton kernels fall back to torch's"
elif [ -n "$WHEELHOUSE" ] && ! compgen -G "$WHEELHOUSE/triton-*.whl" > /dev/null; then
  echo "[install]   the wheelhouse has no triton: skipped; the Triton kernel tests will skip"
else
  pip_install -q "$(pin triton)"
fi

say "check: mmcv ops on ${DEVICE} and plugin import"
"$PY" - "$DEVICE" <<'PY'
import sys

import mmcv, mmdet, mmengine, torch
from mmcv.ops import nms

import mmdet_anchorloss  # noqa: F401
from mmdet_anchorloss.engine.env_info import check_mmcv_ops, format_environment

boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.]])
keep = nms(boxes, torch.tensor([0.9, 0.8]), 0.5)[1]
assert keep.tolist() == [0], keep
device = sys.argv[1]
if device == 'cuda' and torch.cuda.is_available():
    check_mmcv_ops('cuda')
print(f"[install] ok: torch {torch.__version__}, mmcv {mmcv.__version__}, "
      f"mmengine {mmengine.__version__}, mmdet {mmdet.__version__}")
print(f"[install] {format_environment()}")
PY
echo "[install] done in $((SECONDS - START)) s"
