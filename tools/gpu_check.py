"""``make gpu-check``: gpu tests, CUDA benchmark and a short upstream comparison in one report.

See ``mmdet_anchorloss/engine/gpu_check.py``. Exits 2, saying so, on a machine without a
CUDA GPU.

Example::

    python tools/gpu_check.py --out work_dirs/gpu_check
    python tools/gpu_check.py --iters 100 --skip benchmark
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmdet_anchorloss.engine.gpu_check import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
