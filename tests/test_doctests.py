"""The ``>>>`` examples in public docstrings are executed, so they cannot drift from the code."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["fastrft.algo.advantage", "fastrft.report.stats", "fastrft.report.decide", "fastrft.rewards.answers",
           "fastrft.config", "fastrft.data.selection"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
