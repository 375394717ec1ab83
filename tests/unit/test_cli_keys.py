"""`agentrun keys create --expires`: durations and dates."""

from __future__ import annotations

import argparse
import time

import pytest

from agentrun._cli_keys import expiry


def test_an_expiry_is_a_duration_from_now_or_a_utc_date() -> None:
    now = time.time()
    assert 90 * 86400 - 5 < expiry("90d") - now <= 90 * 86400 + 5
    assert 12 * 3600 - 5 < expiry("12h") - now <= 12 * 3600 + 5
    assert 1800 - 5 < expiry("30m") - now <= 1800 + 5
    assert expiry("2999-01-31") == expiry("2999-01-31T00:00:00+00:00")
    assert expiry("2999-01-31T01:00+01:00") == expiry("2999-01-31T00:00")


@pytest.mark.parametrize("text", ["soon", "12x", "2001-01-01", "0s"])
def test_an_expiry_that_is_not_one_or_not_in_the_future_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        expiry(text)
