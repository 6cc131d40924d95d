"""Fixtures of the engine tests (helpers are in ``engine_utils``)."""

from pathlib import Path

import pytest
from engine_utils import make_shapes


@pytest.fixture(scope='session')
def shapes_root(tmp_path_factory) -> Path:
    """A shapes dataset of 8 train and 2 val images of 64x64, shared by the engine tests."""
    return make_shapes(tmp_path_factory.mktemp('engine_data') / 'shapes')
