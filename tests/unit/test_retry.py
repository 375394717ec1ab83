"""The SDK's one retry policy (`agentrun._retry`): what each failure makes the writer's uploads,
live runs' event stream and the Work stream do."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

from agentrun._retry import REFUSED, TRANSIENT, Failure, Verdict
from agentrun_server.serving._status import retry_info_trailer

Code = grpc.StatusCode
EVERY_FAILURE = [code for code in Code if code is not Code.OK]


def aio_error(
    code: grpc.StatusCode, details: str = "x", retry_after: float | None = None
) -> grpc.RpcError:
    trailer = retry_info_trailer(code, details, retry_after) if retry_after is not None else ()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailer), details)


@pytest.mark.parametrize("code", EVERY_FAILURE)
def test_a_unary_call_retries_only_what_passes_and_a_stream_all_but_refusals(
    code: grpc.StatusCode,
) -> None:
    failure = Failure(code, "boom", None)
    unary = Verdict.RETRY if code in TRANSIENT else Verdict.GIVE_UP
    assert failure.verdict() is unary
    assert failure.verdict(stream=True) is (Verdict.GIVE_UP if code in REFUSED else Verdict.RETRY)


@pytest.mark.parametrize("code", EVERY_FAILURE)
def test_retry_info_is_a_retry_whatever_the_code(code: grpc.StatusCode) -> None:
    failure = Failure.of(aio_error(code, retry_after=2.5))
    assert failure.retry_after_seconds == 2.5
    assert failure.verdict() is failure.verdict(stream=True) is Verdict.RETRY


def test_a_stream_reconnects_after_what_a_server_killed_mid_write_or_a_stream_cap_ends_it_with() -> (
    None
):
    # grpc/grpc#36066: INTERNAL or UNKNOWN; a cap on streams: RESOURCE_EXHAUSTED, no RetryInfo.
    for code in (Code.INTERNAL, Code.UNKNOWN, Code.RESOURCE_EXHAUSTED):
        failure = Failure.of(aio_error(code, "Stream removed"))
        assert failure.verdict(stream=True) is Verdict.RETRY
        assert failure.verdict() is Verdict.GIVE_UP


def test_a_message_over_a_limit_is_split_on_a_unary_call() -> None:
    failure = Failure(Code.RESOURCE_EXHAUSTED, "Received message larger than max (5 vs. 4)", None)
    assert failure.verdict() is Verdict.SPLIT
    assert failure.verdict(stream=True) is Verdict.RETRY


def test_failures_are_read_from_aio_errors_with_their_trailers() -> None:
    failure = Failure.of(aio_error(Code.UNAVAILABLE, "storage full", retry_after=5))
    assert (failure.code, failure.details, failure.retry_after_seconds) == (
        Code.UNAVAILABLE,
        "storage full",
        5.0,
    )
    assert str(failure) == "UNAVAILABLE: storage full"
