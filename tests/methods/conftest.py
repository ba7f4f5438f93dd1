"""Fixtures of the method tests: the synthetic set the learning tests train on (``_learning.py``)."""

from __future__ import annotations

import pytest

from tests.methods._learning import make_learning_set


@pytest.fixture(scope="session")
def learning_set(tmp_path_factory: pytest.TempPathFactory):
    return make_learning_set(tmp_path_factory.mktemp("learning_set"))
