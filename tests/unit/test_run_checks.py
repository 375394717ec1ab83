"""The run checks shared by the writer and the server: the fast nesting test (a decode inside
nested groups, in protobuf's C code) says "shallow" only of runs the exact walk passes, and both
paths refuse the same runs naming the same field."""

from __future__ import annotations

import random
from typing import Any

import pytest

from agentrun._convert import struct_to_proto, value_to_proto
from agentrun.v1 import agent_run_pb2 as pb
from agentrun.wire.checks import _PROBE_LEVELS, InvalidRun, check_agent_run, parse_agent_run
from agentrun.wire.limits import MAX_VALUE_DEPTH


def _value(rng: random.Random, depth: int) -> Any:
    if depth == 0:
        return rng.choice(["s", 1, 2.5, None, True, [], {}])
    if rng.random() < 0.5:
        return [_value(rng, depth - 1), "pad" * rng.randint(0, 3)]
    return {f"k{i}": _value(rng, depth - 1) for i in range(rng.choice([1, 1, 1, 2]))}


def _run(rng: random.Random) -> pb.AgentRun:
    run = pb.AgentRun(id="r")
    transcript = run.transcripts.add(key="t")
    transcript.messages.add(text="hi").user.SetInParent()
    assistant = transcript.messages.add(text="calling")
    assistant.assistant.SetInParent()
    value = _value(rng, rng.randint(0, MAX_VALUE_DEPTH + 8))
    where = rng.choice(["metadata", "transcript", "arguments"])
    if where == "metadata":
        value_to_proto(value, run.metadata.fields["x"].value)
    elif where == "transcript":
        value_to_proto(value, transcript.metadata.fields["x"].value)
    else:
        struct_to_proto({"a": value}, assistant.assistant.tool_calls.add(id="c").arguments)
    return run


def _verdict(run: pb.AgentRun, shallow: bool) -> str | None:
    try:
        check_agent_run(run, shallow=shallow)
    except InvalidRun as exc:
        return exc.field
    return None


def test_the_fast_nesting_test_agrees_with_the_exact_walk() -> None:
    if not _PROBE_LEVELS:
        pytest.skip("this protobuf runtime has no nesting limit to probe with")
    rng = random.Random(7)
    refused = fast = 0
    for _ in range(1500):
        run = _run(rng)
        exact = _verdict(run, shallow=False)
        parsed, shallow = parse_agent_run(run.SerializeToString())
        assert parsed == run
        if shallow:
            fast += 1
            assert exact is None, "said shallow of a run the walk refuses"
        assert _verdict(parsed, shallow) == exact
        refused += exact is not None
    assert refused > 300 and fast > 600  # both kinds of run were met


@pytest.mark.parametrize("levels", [MAX_VALUE_DEPTH, MAX_VALUE_DEPTH + 1])
def test_the_limit_holds_exactly_on_the_cheapest_nesting(levels: int) -> None:
    run = pb.AgentRun(id="r")
    run.transcripts.add(key="t").messages.add(text="hi").user.SetInParent()
    value = run.metadata.fields["chain"].value
    for _ in range(levels):
        value = value.list_value.values.add()
    value.string_value = "x"
    parsed, shallow = parse_agent_run(run.SerializeToString())
    refused = _verdict(parsed, shallow)
    assert (refused is not None) == (levels > MAX_VALUE_DEPTH)


@pytest.mark.parametrize(
    ("seconds", "nanos", "reason"),
    [
        (253_402_300_800, 0, "0001-01-01..9999-12-31"),  # 10000-01-01
        (-62_135_596_801, 0, "0001-01-01..9999-12-31"),
        (0, 1_000_000_000, "0..999,999,999"),
        (0, -1, "0..999,999,999"),
    ],
)
def test_a_message_timestamp_out_of_range_is_refused_naming_it(
    seconds: int, nanos: int, reason: str
) -> None:
    run = pb.AgentRun(id="r")
    message = run.transcripts.add(key="t").messages.add(text="hi")
    message.user.SetInParent()
    message.timestamp.seconds, message.timestamp.nanos = 253_402_300_799, 999_999_999
    assert _verdict(run, shallow=True) is None  # the last instant there is
    message.timestamp.seconds, message.timestamp.nanos = seconds, nanos
    for shallow in (True, False):
        with pytest.raises(InvalidRun, match=reason) as raised:
            check_agent_run(run, shallow=shallow)
        assert raised.value.field == "transcripts[0].messages[0].timestamp"


def test_a_run_converted_from_the_model_skips_only_what_the_model_proved() -> None:
    """`from_model`: messages are not walked once the nesting is known shallow (the model gave
    each a role and content); the run's own checks still hold, and a deep run is walked."""
    run = pb.AgentRun(id="r")
    run.transcripts.add(key="t").messages.add(text="no role")  # no model makes this
    with pytest.raises(InvalidRun, match="required"):
        check_agent_run(run, shallow=True)
    check_agent_run(run, shallow=True, from_model=True)
    with pytest.raises(InvalidRun, match="required"):
        check_agent_run(run, shallow=False, from_model=True)
    run.transcripts.add(key="t")
    with pytest.raises(InvalidRun, match="duplicate key") as raised:
        check_agent_run(run, shallow=True, from_model=True)
    assert raised.value.field == "transcripts[1].key"
    run.id = "not\nprintable"
    with pytest.raises(InvalidRun) as raised:
        check_agent_run(run, shallow=True, from_model=True)
    assert raised.value.field == "id"
