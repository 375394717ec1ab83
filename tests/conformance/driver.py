"""The Python driver of the conformance scenario (scenario.json; its "comment" says the rules):
the generated Python client (`agentrun.v1`) at the level of the proto3 JSON mapping, as every
language's driver works, so that the scenario, not the SDK, says what the server must answer.

    python tests/conformance/driver.py --server HOST:PORT --keys KEYS.json [--scenario FILE]

Prints a line per step (`ok`, or `FAIL` with what differed), then `passed N/M`; exits 1 if a
step failed. `scripts/conformance.py` (make conformance) starts the server and makes the keys.
"""

from __future__ import annotations

import argparse
import json
import queue
import re
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, message_factory

from agentrun.v1 import ingestion_service_pb2, orchestrator_service_pb2

SERVICES = {
    "IngestionService": ingestion_service_pb2.DESCRIPTOR.services_by_name["IngestionService"],
    "OrchestratorService": orchestrator_service_pb2.DESCRIPTOR.services_by_name[
        "OrchestratorService"
    ],
}
WorkRequest = orchestrator_service_pb2.WorkRequest
WorkResponse = orchestrator_service_pb2.WorkResponse
RECEIVE_SECONDS = 10.0
_VARIABLE = re.compile(r"\$\{([^}]+)\}")


class Failed(Exception):
    """A step's answer differed from what the scenario expects."""


def lookup(saved: dict[str, Any], path: str) -> Any:
    value: Any = saved
    for part in path.split("."):
        if isinstance(value, list):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return ""  # absent in the proto3 JSON mapping: the default
    return value


def substitute(value: Any, saved: dict[str, Any]) -> Any:
    """`value` with every "${name.path}" replaced by what was saved."""
    if isinstance(value, str):
        whole = _VARIABLE.fullmatch(value)
        if whole:
            return lookup(saved, whole.group(1))
        return _VARIABLE.sub(lambda m: str(lookup(saved, m.group(1))), value)
    if isinstance(value, list):
        return [substitute(v, saved) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, saved) for k, v in value.items()}
    return value


def match(expected: Any, actual: Any, where: str = "") -> None:
    """Raise Failed where `actual` (proto3 JSON) is not a superset of `expected`."""
    if expected == "*":
        if actual in (None, "", [], {}):
            raise Failed(f"{where or 'answer'}: expected a value, got none")
        return
    if isinstance(expected, dict):
        if actual is None:
            actual = {}
        if not isinstance(actual, dict):
            raise Failed(f"{where}: expected an object, got {actual!r}")
        for key, value in expected.items():
            match(value, actual.get(key), f"{where}.{key}" if where else key)
        return
    if isinstance(expected, list):
        actual = actual or []
        if not isinstance(actual, list) or len(actual) != len(expected):
            raise Failed(f"{where}: expected {len(expected)} items, got {actual!r}")
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            match(e, a, f"{where}[{i}]")
        return
    if actual is None and expected in (0, False, ""):
        return
    if isinstance(expected, bool) or isinstance(actual, bool):
        if expected != actual:
            raise Failed(f"{where}: expected {expected!r}, got {actual!r}")
        return
    if str(expected) != str(actual):
        raise Failed(f"{where}: expected {expected!r}, got {actual!r}")


def to_json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message)  # type: ignore[no-any-return]


class WorkStream:
    """One Work stream: requests written from a queue, responses read on a thread."""

    def __init__(self, channel: grpc.Channel, metadata: list[tuple[str, str]]) -> None:
        self.requests: queue.Queue[Any] = queue.Queue()
        self.responses: queue.Queue[Any] = queue.Queue()
        self.buffered: list[dict[str, Any]] = []
        self.ended: grpc.StatusCode | None = None
        self.details = ""
        work = channel.stream_stream(
            "/agentrun.v1.OrchestratorService/Work",
            request_serializer=WorkRequest.SerializeToString,
            response_deserializer=WorkResponse.FromString,
        )
        self.call = work(iter(self.requests.get, None), metadata=metadata)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.responses.put(to_json(response))
            self.responses.put(("end", grpc.StatusCode.OK, ""))
        except grpc.RpcError as exc:
            self.responses.put(("end", exc.code(), exc.details()))

    def send(self, request: dict[str, Any]) -> None:
        self.requests.put(json_format.ParseDict(request, WorkRequest()))

    def next(self, timeout: float) -> dict[str, Any] | tuple[str, grpc.StatusCode, str]:
        return self.responses.get(timeout=timeout)  # type: ignore[no-any-return]

    def receive(self, kind: str, timeout: float = RECEIVE_SECONDS) -> dict[str, Any]:
        """The next message of `kind`; others read meanwhile are kept for later steps."""
        for i, message in enumerate(self.buffered):
            if kind in message:
                return self.buffered.pop(i)
        while True:
            try:
                message = self.next(timeout)
            except queue.Empty:
                raise Failed(f"no {kind} within {timeout} s") from None
            if isinstance(message, tuple):
                raise Failed(f"the stream ended {message[1].name}: {message[2]}")
            if kind in message:
                return message
            self.buffered.append(message)


def run_step(
    step: dict[str, Any],
    channel: grpc.Channel,
    keys: dict[str, str],
    streams: dict[str, WorkStream],
    saved: dict[str, Any],
) -> None:
    metadata = [("authorization", f"Bearer {keys[step['as']]}")] if "as" in step else []
    expect = substitute(step.get("expect"), saved)
    if "call" in step:
        service, method = step["call"].split("/")
        descriptor = SERVICES[service].methods_by_name[method]
        request_class = message_factory.GetMessageClass(descriptor.input_type)
        response_class = message_factory.GetMessageClass(descriptor.output_type)
        path = f"/agentrun.v1.{service}/{method}"
        try:
            if "requests" in step:
                call = channel.stream_unary(
                    path, request_class.SerializeToString, response_class.FromString
                )
                requests = [
                    json_format.ParseDict(substitute(r, saved), request_class())
                    for r in step["requests"]
                ]
                response = call(iter(requests), metadata=metadata, timeout=30)
            else:
                call = channel.unary_unary(
                    path, request_class.SerializeToString, response_class.FromString
                )
                request = json_format.ParseDict(substitute(step["request"], saved), request_class())
                response = call(request, metadata=metadata, timeout=30)
            code, answer = "OK", to_json(response)
        except grpc.RpcError as exc:
            code, answer = exc.code().name, {}
        match(expect.get("code", "OK"), code, "code")
        match(expect.get("response", {}), answer, "response")
        for name, where in step.get("save", {}).items():
            saved[name] = lookup(answer, where)
        return
    stream_name = step["stream"]
    if "open" in step:
        stream = streams[stream_name] = WorkStream(channel, metadata)
        stream.send({"subscribe": substitute(step["open"], saved)})
        first = stream.next(RECEIVE_SECONDS)
        if isinstance(first, tuple):
            match(expect.get("code", "OK"), first[1].name, "code")
            return
        match(expect.get("code", "OK"), "OK", "code")
        match({k: v for k, v in expect.items() if k != "code"}, first, "")
        return
    stream = streams[stream_name]
    if "send" in step:
        stream.send(substitute(step["send"], saved))
    if "receive" in step:
        kind = step["receive"]
        if kind == "leases":
            leases: list[dict[str, Any]] = []
            while len(leases) < step["count"]:
                leases += stream.receive("leases")["leases"]["leases"]
            if len(leases) > step["count"]:
                raise Failed(f"expected {step['count']} leases, got {len(leases)}")
            if expect is not None:
                match(expect, leases, "leases")
            for name, lease in zip(step.get("save", []), leases, strict=False):
                saved[name] = lease
            return
        message = stream.receive(kind)[kind]
        if expect is not None:
            match(expect, message, kind)
        for name, where in step.get("save", {}).items():
            saved[name] = lookup(message, where)
        return
    if "quiet" in step:
        try:
            message = stream.next(float(step["quiet"]))
        except queue.Empty:
            return
        raise Failed(f"expected nothing for {step['quiet']} s, got {message!r}")
    if step.get("close"):
        stream.requests.put(None)  # the worker's half-close
        while True:
            try:
                message = stream.next(RECEIVE_SECONDS)
            except queue.Empty:
                raise Failed("the stream did not end after the half-close") from None
            if isinstance(message, tuple):
                match(expect.get("code", "OK"), message[1].name, "code")
                return


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--keys", required=True, type=Path, help="JSON: key name -> token")
    parser.add_argument("--scenario", type=Path, default=Path(__file__).with_name("scenario.json"))
    args = parser.parse_args()
    scenario = json.loads(args.scenario.read_text())
    keys = json.loads(args.keys.read_text())
    streams: dict[str, WorkStream] = {}
    saved: dict[str, Any] = {}
    passed = 0
    with grpc.insecure_channel(args.server) as channel:
        for step in scenario["steps"]:
            try:
                run_step(step, channel, keys, streams, saved)
            except Failed as failure:
                print(f"FAIL {step['name']}: {failure}")
            else:
                passed += 1
                print(f"ok   {step['name']}")
        for stream in streams.values():
            stream.requests.put(None)
    print(f"passed {passed}/{len(scenario['steps'])}")
    return 0 if passed == len(scenario["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
