"""Build the Triton kernels for an NVIDIA GPU without one, and show what the build holds.

See ``mmdet_anchorloss/kernels/ahead_of_time.py``. Every kernel specialisation the loss
launches goes through Triton's compiler and ptxas for each ``--arch``; the table gives
registers, spills, shared memory, 128-bit vector loads and the PTX's fma / div
instructions. Exits 1 if a kernel does not build. Needs triton (``make install`` brings
it), no GPU; do not set ``TRITON_INTERPRET``.

Example::

    python tools/compile_kernels.py                      # sm_90 (H100, H200) and sm_80 (A100)
    python tools/compile_kernels.py --arch 90 --json work_dirs/kernels_sm90.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmdet_anchorloss.kernels.ahead_of_time import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
