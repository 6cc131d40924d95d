"""Shared pytest setup: CUDA tests skip themselves without a GPU; eager kernels by default.

The fused kernels run eagerly in tests (``MMDET_ANCHORLOSS_COMPILE=0``) to keep the suite
fast; ``test_fused_losses.py`` runs the compiled path explicitly.
"""

import os

import pytest
import torch

os.environ.setdefault('MMDET_ANCHORLOSS_COMPILE', '0')


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs CUDA')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)


def pytest_generate_tests(metafunc):
    """``device`` parameter: cpu always, cuda as a ``gpu``-marked case."""
    if 'device' in metafunc.fixturenames:
        metafunc.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.gpu)])
