"""One side of one benchmark case, in its own process.

``python -m mmdet_anchorloss.benchmark.worker OPTIONS_JSON RESULT_FILE``: measures the
side (``WorkerOptions`` as JSON) and writes its record to RESULT_FILE as JSON. If the side
cannot run the case (an error, out of memory), the record holds ``error`` (the exception's
type and message; the traceback goes to stderr) and the exit status is 1.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

from .measure import WorkerOptions, run_worker

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding mmdet_anchorloss/


def command(opts: WorkerOptions, result_file: str) -> list:
    """The command line of a worker for ``opts``."""
    options = json.dumps(opts._asdict())
    return [sys.executable, '-m', 'mmdet_anchorloss.benchmark.worker', options, result_file]


def environment(threads: Optional[int] = None) -> dict:
    """The workers' environment: this process's, with the package it imported first on
    ``PYTHONPATH`` (the live tree; each record hashes the sources it ran) and
    ``OMP_NUM_THREADS`` set to ``threads`` if given."""
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get('PYTHONPATH')) if p)
    env = dict(os.environ, PYTHONPATH=path)
    if threads:
        env['OMP_NUM_THREADS'] = str(threads)
    return env


def run_side(opts: WorkerOptions, log_file: Path, env: dict) -> dict:
    """Run one worker to completion; its record, or one with ``error`` if it failed.

    The worker's output goes to ``log_file``; a failed worker's record ends with its tail.
    """
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, 'result.json')
        start = time.perf_counter()
        with open(log_file, 'w') as log:
            proc = subprocess.run(
                command(opts, result_file), stdout=log, stderr=subprocess.STDOUT, env=env
            )
        wall = time.perf_counter() - start
        record = json.loads(Path(result_file).read_text()) if os.path.isfile(result_file) else {}
    if proc.returncode != 0 or 'error' in record:
        reason = record.get('error') or f'exit {proc.returncode} without a result'
        tail = log_file.read_text()[-2000:]
        return dict(side=opts.side, error=reason, log=str(log_file), log_tail=tail)
    record['worker_wall_s'] = wall
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('options', help='WorkerOptions as a JSON object')
    parser.add_argument('result_file', help='where the JSON record goes')
    args = parser.parse_args(argv)
    opts = WorkerOptions(**json.loads(args.options))
    try:
        record, status = run_worker(opts), 0
    except Exception as err:  # a side that cannot run a case is a result, not a crash
        traceback.print_exc()
        message = str(err).strip().splitlines()[0] if str(err).strip() else ''
        record, status = dict(side=opts.side, error=f'{type(err).__name__}: {message}'), 1
    Path(args.result_file).write_text(json.dumps(record, indent=1))
    return status


if __name__ == '__main__':
    sys.exit(main())
