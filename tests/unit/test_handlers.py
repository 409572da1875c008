"""kopf settings the operator relies on."""

from __future__ import annotations

import itertools
from collections.abc import Sized

import kopf
import pytest

from finetune_operator.handlers import configure

pytestmark = pytest.mark.unit


def test_api_requests_are_retried_for_as_long_as_the_server_is_away() -> None:
    settings = kopf.OperatorSettings()
    configure(settings)
    backoffs = settings.networking.error_backoffs
    assert not isinstance(backoffs, (float, int, Sized)), "a sized iterable would end: kopf gives up"
    first = list(itertools.islice(iter(backoffs), 1000))
    assert len(first) == 1000 and max(first) == 10.0
    assert list(itertools.islice(iter(backoffs), 3)) == [1.0, 1.0, 2.0], "each request starts from 1 s"
