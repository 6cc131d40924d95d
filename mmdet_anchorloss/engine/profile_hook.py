"""A training hook that records what ``tools/compare_upstream.py`` compares.

Registered in mmdet's ``HOOKS`` as ``AnchorLossProfileHook`` when this module is imported
(:mod:`.compare_worker` does; nothing else needs it).
"""

import json
import resource
import time
from pathlib import Path

import torch
from mmdet.registry import HOOKS
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

__all__ = ['AnchorLossProfileHook']


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@HOOKS.register_module()
class AnchorLossProfileHook(Hook):
    """Record each iteration's losses and times, the anchor head's loss time, peak memory and
    the last evaluation's metrics; write them as JSON to ``out_file`` after the run.

    The record's lists hold one entry per iteration: ``losses`` (dict of floats, the runner's
    logged losses), ``iter_time`` (s, ``before_train_iter`` to ``after_train_iter``:
    forward, backward, optimizer step), ``wall_time`` (s, since the previous iteration ended:
    also the data wait) and ``loss_time`` (s, the anchor head's ``loss_by_feat`` forward; its
    backward is part of ``iter_time``).

    Args:
        out_file (str): where to write the profile.
        extra (dict, optional): copied into the record as is (e.g. the side and seed).
    """

    # after_train_iter before any other hook (checkpoint saving, logging) runs.
    priority = 'HIGHEST'

    def __init__(self, out_file: str, extra: dict = None):
        self.out_file = out_file
        self.record = dict(extra or {})
        self.record.update(losses=[], iter_time=[], wall_time=[], loss_time=[], metrics={})
        self._loss_time = 0.0
        self._head = None

    def before_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        rpn_head = getattr(model, 'rpn_head', None)
        head = rpn_head or model.bbox_head
        self._head = head
        original = head.loss_by_feat

        def timed_loss_by_feat(*args, **kwargs):
            _sync()
            start = time.perf_counter()
            out = original(*args, **kwargs)
            _sync()
            self._loss_time += time.perf_counter() - start
            return out

        head.loss_by_feat = timed_loss_by_feat
        self.record['head'] = type(head).__name__
        self.record['head_attr'] = 'rpn_head' if head is rpn_head else 'bbox_head'
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._train_start = self._last_end = time.perf_counter()

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        _sync()
        self._loss_time = 0.0
        self._iter_start = time.perf_counter()

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        _sync()
        end = time.perf_counter()
        self.record['iter_time'].append(end - self._iter_start)
        self.record['wall_time'].append(end - self._last_end)
        self.record['loss_time'].append(self._loss_time)
        losses = {k: float(torch.as_tensor(v).detach()) for k, v in (outputs or {}).items()}
        self.record['losses'].append(losses)
        self._last_end = end

    def after_train(self, runner) -> None:
        self.record['train_time_s'] = time.perf_counter() - self._train_start
        if torch.cuda.is_available():
            self.record['peak_mem_mb'] = torch.cuda.max_memory_allocated() / 2**20
            self.record['mem_kind'] = 'CUDA max allocated'
        else:
            rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.record['peak_mem_mb'] = rss_kb / 1024
            self.record['mem_kind'] = 'CPU peak RSS (main process)'
        if self._head is not None:
            del self._head.loss_by_feat  # back to the class method

    def after_val_epoch(self, runner, metrics=None) -> None:
        self.record['metrics'] = {k: float(v) for k, v in (metrics or {}).items()}

    def after_test_epoch(self, runner, metrics=None) -> None:
        self.after_val_epoch(runner, metrics)

    def after_run(self, runner) -> None:
        if runner.rank == 0:
            Path(self.out_file).write_text(json.dumps(self.record, indent=1))
