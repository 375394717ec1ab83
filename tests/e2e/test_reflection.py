"""Server reflection as grpcurl, Postman and Evans use it: v1 asked first, v1alpha as the fallback;
every listed service resolved into a descriptor pool of the client's own, its methods callable by
name."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2

from agentrun_server import Server, ServerConfig


@pytest.fixture
async def server(tmp_path) -> AsyncIterator[Server]:
    server = Server(
        ServerConfig(db=f"sqlite:///{tmp_path / 'a.db'}", port=0, metrics_port=-1, web_port=-1)
    )
    await server.start()
    yield server
    await server.shutdown(grace_seconds=1)


async def _ask(
    channel: grpc.aio.Channel, version: str, requests: list[reflection_pb2.ServerReflectionRequest]
) -> list[reflection_pb2.ServerReflectionResponse]:
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return [answer async for answer in call(iter(requests), timeout=10)]


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_every_listed_service_resolves_into_a_clients_own_pool(
    server: Server, version: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        listed = await _ask(
            channel, version, [reflection_pb2.ServerReflectionRequest(list_services="")]
        )
        names = sorted(s.name for s in listed[0].list_services_response.service)
        assert {
            "agentrun.v1.IngestionService",
            "agentrun.v1.OrchestratorService",
            "agentrun.v1.KeyService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= set(names)
        answers = await _ask(
            channel,
            version,
            [reflection_pb2.ServerReflectionRequest(file_containing_symbol=n) for n in names],
        )
        pool = descriptor_pool.DescriptorPool()
        files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        for name, answer in zip(names, answers, strict=True):
            assert answer.HasField("file_descriptor_response"), (name, answer.error_response)
            for data in answer.file_descriptor_response.file_descriptor_proto:
                file = descriptor_pb2.FileDescriptorProto.FromString(data)
                files[file.name] = file
        added: set[str] = set()

        def add(file: descriptor_pb2.FileDescriptorProto) -> None:
            if file.name in added:
                return
            for dependency in file.dependency:
                add(files[dependency])
            pool.Add(file)
            added.add(file.name)

        for file in files.values():
            add(file)
        work = pool.FindServiceByName("agentrun.v1.OrchestratorService").FindMethodByName("Work")
        assert work.input_type.full_name == "agentrun.v1.WorkRequest"
        v1 = pool.FindServiceByName("grpc.reflection.v1.ServerReflection")
        method = v1.FindMethodByName("ServerReflectionInfo")
        assert method.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"
        assert not v1.file.GetOptions().deprecated  # v1alpha's file is deprecated; v1's is not
