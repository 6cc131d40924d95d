#!/usr/bin/env bash
# Create .venv and install the pinned, tested stack (see requirements/constraints.txt).
# Idempotent: steps whose result is already present are skipped; pip's wheel cache keeps
# the mmcv build, so a second run on the same machine takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
CONSTRAINTS=requirements/constraints.txt
pin() { grep -E "^$1==" "$CONSTRAINTS" | head -n 1; }

step=""
trap 'echo "[install] FAILED at step: ${step}. See the pip output above." >&2' ERR
say() { step="$1"; echo "[install] $1"; }

say "virtual environment ${VENV}"
if [ ! -x "${VENV}/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="${VENV}/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)

say "torch (kept if already installed; never replaces a user's CUDA build)"
if "$PY" -c "import torch" 2>/dev/null; then
  echo "[install]   torch $("$PY" -c 'import torch; print(torch.__version__)') present, kept"
else
  "${PIP[@]}" "$(pin torch)"
fi

# mmcv 2.1.0's setup.py needs setuptools<70 (pkg_resources API); torch 2.13 and mmengine
# want setuptools>=77,<82 at run time. Build with the old one, then move to the pinned one.
MMCV_BUILD_SETUPTOOLS="setuptools==69.5.1"

say "mmcv 2.1.0 with compiled ops (first build: about 7 minutes on 2 cores)"
if "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" 2>/dev/null; then
  echo "[install]   mmcv $("$PY" -c 'import mmcv; print(mmcv.__version__)') with ops present, kept"
else
  say "build tools for mmcv (${MMCV_BUILD_SETUPTOOLS}, numpy, ninja)"
  "${PIP[@]}" -q "$MMCV_BUILD_SETUPTOOLS" "$(pin wheel)" "$(pin numpy)" "$(pin ninja)"
  say "mmcv 2.1.0 build"
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} "${PIP[@]}" --no-build-isolation \
    "$(pin mmcv)" "$(pin numpy)" "$(pin opencv-python)"
fi

say "mmengine, mmdet, pinned run-time and dev packages, mmdet_anchorloss (editable)"
"${PIP[@]}" -q -c "$CONSTRAINTS" "$(pin setuptools)" "$(pin mmengine)" "$(pin mmdet)" \
  "$(pin pycocotools)" "$(pin matplotlib)" "$(pin scipy)" "$(pin shapely)" \
  "$(pin terminaltables)" "$(pin tqdm)" "$(pin pytest)" "$(pin ruff)" -e ".[dev]"

say "check: mmcv ops and plugin import"
"$PY" - <<'PY'
import torch, mmcv, mmdet, mmengine
from mmcv.ops import nms
import mmdet_anchorloss  # noqa: F401
boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.]])
keep = nms(boxes, torch.tensor([0.9, 0.8]), 0.5)[1]
assert keep.tolist() == [0], keep
print(f"[install] ok: torch {torch.__version__}, mmcv {mmcv.__version__}, "
      f"mmengine {mmengine.__version__}, mmdet {mmdet.__version__}")
PY
