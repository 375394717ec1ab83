"""Connecting to an agentrun server, and a small synchronous client for the unary calls, which
answers with SDK records (`agentrun._records`) and models, never generated types."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

import grpc

from agentrun._agent_run import AgentRun
from agentrun._connection import Connection, connection_of
from agentrun._convert import agent_run_from_proto
from agentrun._errors import RpcError
from agentrun._metadata import BaseAgentRunMetadata
from agentrun._records import (
    ApiKey,
    ApiKeyCreated,
    Collection,
    CollectionCreated,
    Deletion,
    ListedRun,
    RunPage,
    RunUpdate,
    StageBacklog,
    Task,
    TaskState,
    Workflow,
    WorkflowApplied,
)
from agentrun._tls_probe import tls_mismatch
from agentrun._workflow import WorkflowSpec
from agentrun.v1 import ingestion_service_pb2 as ingestion_pb
from agentrun.v1 import ingestion_service_pb2_grpc as ingestion_grpc
from agentrun.v1 import key_service_pb2 as key_pb
from agentrun.v1 import key_service_pb2_grpc as key_grpc
from agentrun.v1 import orchestrator_service_pb2 as orchestrator_pb
from agentrun.v1 import orchestrator_service_pb2_grpc as orchestrator_grpc
from agentrun.v1 import workflow_pb2
from agentrun.wire.connection import ENV_SERVER
from agentrun.wire.filters import parse_filters

CALL_TIMEOUT_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 5.0
"""How long a client call waits for an unreachable server before failing with its address."""
TLS_PROBE_AFTER_SECONDS = 0.5
"""A connection not made by then is probed for a TLS mismatch (`agentrun._tls_probe`)."""

T = TypeVar("T")


def unreachable(target: str, channel: grpc.Channel, waited_seconds: float) -> RpcError:
    """The error for a server not reached within `waited_seconds`: its address, and the cause
    gRPC gives for it (one call that does not wait for the connection)."""
    cause = f"no connection within {waited_seconds:g} s"
    try:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None
        )
        check(b"", timeout=2)
    except grpc.RpcError as exc:
        details = (exc.details() if isinstance(exc, grpc.Call) else str(exc)) or ""
        last = details.rsplit(": ", 1)[-1].strip(" ]")
        if last:
            cause = last[0].lower() + last[1:]
    return RpcError(
        grpc.StatusCode.UNAVAILABLE,
        f"cannot reach the agentrun server at {target}: {cause}; is `agentrun serve` running "
        f"there? (set --server or ${ENV_SERVER})",
    )


@contextmanager
def translate_rpc_errors() -> Iterator[None]:
    """Re-raise grpc errors as `RpcError` (the one place the SDK maps transport errors)."""
    try:
        yield
    except grpc.RpcError as exc:
        raise RpcError.from_grpc(exc) from exc


class Client:
    """A synchronous client for the unary calls of both services.

    Args:
        server_url: The server (`host:port`, or `grpcs://host[:port]` for TLS); None uses
            the connection's, else $AGENTRUN_SERVER, else 127.0.0.1:50051.
        api_key: Sent as `authorization: Bearer <key>` on every call; None uses the
            connection's, else $AGENTRUN_API_KEY.
        connection: TLS, client certificate, metadata, keepalive (see `Connection`); None: from
            the environment.

    Every method raises `RpcError` when the call fails (e.g. NOT_FOUND for an unknown name).
    """

    def __init__(
        self,
        server_url: str | None = None,
        *,
        api_key: str | None = None,
        connection: Connection | None = None,
        connect_timeout_seconds: float = CONNECT_TIMEOUT_SECONDS,
    ) -> None:
        self.connection = connection_of(server_url, api_key, connection)
        self.server_url = server_url
        self.connect_timeout_seconds = connect_timeout_seconds
        self._metadata = self.connection.call_metadata()
        self._channel = self.connection.channel()
        self._connected = False
        self._health_check = self._channel.unary_unary(
            "/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None
        )
        self.ingestion = ingestion_grpc.IngestionServiceStub(self._channel)
        self.orchestrator = orchestrator_grpc.OrchestratorServiceStub(self._channel)
        self.keys = key_grpc.KeyServiceStub(self._channel)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> None:
        """Wait up to the connect timeout for the server, once per client.

        Raises:
            RpcError: UNAVAILABLE, naming the address and why it cannot be reached.
        """
        if self._connected:
            return
        # A TLS mismatch never heals: after a first short wait, probe for one and say so at once
        # rather than wait out the timeout and blame the address.
        first = min(TLS_PROBE_AFTER_SECONDS, self.connect_timeout_seconds)
        if not self._answers_within(first):
            mismatch = tls_mismatch(self.connection)
            if mismatch is not None:
                raise RpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"cannot talk to the agentrun server at {self.connection.target}: {mismatch}",
                )
            if not self._answers_within(self.connect_timeout_seconds - first):
                raise unreachable(
                    self.connection.target, self._channel, self.connect_timeout_seconds
                )
        self._connected = True

    def _answers_within(self, seconds: float) -> bool:
        """Whether the server answers a health check within `seconds`, waiting for the channel
        to connect. (Not `grpc.channel_ready_future`: its connectivity polling makes the
        channel's close wait up to 200 ms, grpc/grpc#19100, for every short-lived client.)"""
        try:
            self._health_check(b"", timeout=seconds, wait_for_ready=True)
        except grpc.RpcError as exc:
            # Any answer but these came from a server: reached (even UNIMPLEMENTED).
            code = exc.code() if isinstance(exc, grpc.Call) else None
            return code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        return True

    def _call(self, method: Callable[..., T], request: Any) -> T:
        self._connect()
        with translate_rpc_errors():
            return method(
                request,
                timeout=CALL_TIMEOUT_SECONDS,
                wait_for_ready=True,
                metadata=self._metadata,
            )

    def create_collection(
        self,
        name: str,
        description: str = "",
        workflow: str = "",
        *,
        enter_workflow_on_abandon: bool = False,
        retention_days: int = 0,
    ) -> CollectionCreated:
        """Create a collection, or get the one with this name (as it was made: `created` False);
        return it as `get_collection` does, with `created` beside its fields.

        With `workflow`, each run stored enters its first stage; a live run when it finishes, or
        with `enter_workflow_on_abandon` also when it is abandoned (no event for the server's
        `--live-run-timeout`), once either way. With `retention_days`, runs are deleted that
        many days after they are stored (`update_collection` changes it later).
        """
        response = self._call(
            self.ingestion.CreateCollection,
            ingestion_pb.CreateCollectionRequest(
                name=name,
                description=description,
                workflow=workflow,
                enter_workflow_on_abandon=enter_workflow_on_abandon,
                retention_days=retention_days,
            ),
        )
        collection = Collection.from_proto(response.collection)
        return CollectionCreated(**collection.model_dump(), created=response.created)

    def get_collection(self, collection_id: str = "", *, name: str = "") -> Collection:
        """Return a collection by id, or by name."""
        request = (
            ingestion_pb.GetCollectionRequest(name=name)
            if name
            else ingestion_pb.GetCollectionRequest(id=collection_id)
        )
        return Collection.from_proto(self._call(self.ingestion.GetCollection, request).collection)

    def update_collection(
        self,
        collection_id: str = "",
        *,
        name: str = "",
        description: str | None = None,
        retention_days: int | None = None,
    ) -> Collection:
        """Change a collection's description or retention (None: kept; `retention_days` 0 keeps
        runs until deleted); return the collection as it is now. Needs an `admin` key.

        Raises:
            RpcError: NOT_FOUND for no such collection; INVALID_ARGUMENT for a retention over
                36,500 days.
        """
        request = ingestion_pb.UpdateCollectionRequest(
            description=description, retention_days=retention_days
        )
        if name:
            request.name = name
        else:
            request.id = collection_id
        return Collection.from_proto(
            self._call(self.ingestion.UpdateCollection, request).collection
        )

    def delete_collection(
        self, collection_id: str = "", *, name: str = "", force: bool = False
    ) -> Deletion:
        """Delete a collection with its runs and their tasks in every workflow; its name is
        free again. Needs an `admin` key; audited on the server.

        Raises:
            RpcError: NOT_FOUND for no such collection; FAILED_PRECONDITION while a task of one
                of its runs is leased, unless `force` (which cancels those tasks and revokes
                their leases).
        """
        request = ingestion_pb.DeleteCollectionRequest(force=force)
        if name:
            request.name = name
        else:
            request.id = collection_id
        return Deletion.from_proto(self._call(self.ingestion.DeleteCollection, request))

    def delete_runs(
        self,
        agent_run_ids: Sequence[str] = (),
        *,
        collection_id: str = "",
        ingested_before: datetime | None = None,
        force: bool = False,
    ) -> Deletion:
        """Delete runs, with their tasks in every workflow: by id (at most 1,000), or a
        collection's runs stored before `ingested_before` (an aware datetime). Needs an `admin`
        key; audited on the server.

        Raises:
            RpcError: NOT_FOUND for no such collection; FAILED_PRECONDITION while a task of a
                selected run is leased, unless `force` (nothing is deleted then).
        """
        request = ingestion_pb.DeleteAgentRunsRequest(
            agent_run_ids=list(agent_run_ids), collection_id=collection_id, force=force
        )
        if ingested_before is not None:
            if ingested_before.tzinfo is None:
                raise ValueError("ingested_before: give an aware datetime (with a tzinfo)")
            request.ingested_before.FromDatetime(ingested_before)
        return Deletion.from_proto(self._call(self.ingestion.DeleteAgentRuns, request))

    def get_run(
        self,
        agent_run_id: str,
        metadata_type: type[BaseAgentRunMetadata] = BaseAgentRunMetadata,
    ) -> AgentRun:
        """Return a stored run as a model (its metadata as `metadata_type`).

        Raises:
            RpcError: NOT_FOUND when no run has this id.
        """
        stored = self._call(
            self.ingestion.GetAgentRun, ingestion_pb.GetAgentRunRequest(agent_run_id=agent_run_id)
        )
        return agent_run_from_proto(stored.agent_run.agent_run, metadata_type)

    def iter_runs(
        self,
        collection_id: str,
        metadata_type: type[BaseAgentRunMetadata] = BaseAgentRunMetadata,
        page_size: int = 100,
    ) -> Iterator[AgentRun]:
        """Yield a collection's runs as models, in ingestion order, a page at a time (pages hold
        fewer runs when they are large)."""
        for stored in self._pages(collection_id, ingestion_pb.AGENT_RUN_VIEW_FULL, page_size):
            yield agent_run_from_proto(stored.agent_run, metadata_type)

    def get_run_summary(self, agent_run_id: str) -> ListedRun:
        """Where a run is and how it stands (its collection, state, scores, message count), as a
        listing shows it: without its transcripts or metadata.

        Raises:
            RpcError: NOT_FOUND when no run has this id.
        """
        stored = self._call(
            self.ingestion.GetAgentRun,
            ingestion_pb.GetAgentRunRequest(
                agent_run_id=agent_run_id, view=ingestion_pb.AGENT_RUN_VIEW_BASIC
            ),
        )
        return ListedRun.from_proto(stored.agent_run)

    def list_runs(
        self,
        collection_id: str,
        *,
        where: Sequence[str] = (),
        state: str | None = None,
        newest_first: bool = True,
        page_size: int = 100,
        page_token: str = "",
    ) -> RunPage:
        """One page of a collection's runs, newest first (or in ingestion order), without their
        transcripts: those that meet every `where` filter (`'scores.reward < 1'`,
        `'metadata.model = gpt-4o'`: see `agentrun.wire.filters.parse_filter`) and are in
        `state` ("running", "finished" or "abandoned"). Pass the page's `next_page_token` for the
        next. The server matches filters on an index: a page costs what it holds.

        Raises:
            ValueError: a filter is malformed, or `state` is none of those.
            RpcError: NOT_FOUND for an unknown collection; INVALID_ARGUMENT naming a filter.
        """
        filters = parse_filters(tuple(where))
        states = {"running", "finished", "abandoned"}
        if state is not None and state not in states:
            raise ValueError(f"state: {state!r}; choose running, finished or abandoned")
        page = self._call(
            self.ingestion.ListAgentRuns,
            ingestion_pb.ListAgentRunsRequest(
                collection_id=collection_id,
                page_size=page_size,
                page_token=page_token,
                view=ingestion_pb.AGENT_RUN_VIEW_BASIC,
                state=ingestion_pb.AgentRunState.Value(f"AGENT_RUN_STATE_{state.upper()}")
                if state
                else ingestion_pb.AGENT_RUN_STATE_UNSPECIFIED,
                filters=filters,
                newest_first=newest_first,
            ),
        )
        return RunPage(
            runs=[ListedRun.from_proto(r) for r in page.agent_runs],
            next_page_token=page.next_page_token,
        )

    def iter_run_ids(self, collection_id: str) -> Iterator[str]:
        """Yield the ids of a collection's runs, in ingestion order (transcripts not read)."""
        for stored in self._pages(collection_id, ingestion_pb.AGENT_RUN_VIEW_BASIC, 1000):
            yield stored.agent_run.id

    def _pages(
        self, collection_id: str, view: ingestion_pb.AgentRunView.ValueType, page_size: int
    ) -> Iterator[ingestion_pb.StoredAgentRun]:
        token = ""
        while True:
            page = self._call(
                self.ingestion.ListAgentRuns,
                ingestion_pb.ListAgentRunsRequest(
                    collection_id=collection_id, page_size=page_size, page_token=token, view=view
                ),
            )
            yield from page.agent_runs
            token = page.next_page_token
            if not token:
                return

    def enqueue_runs(
        self, workflow: str, agent_run_ids: Iterable[str], stage: str = "", priority: int = 0
    ) -> tuple[int, int]:
        """Create tasks for stored runs at a stage (default: the workflow's first), 1,000 ids per
        call; a run with a ready or leased task in the workflow already is skipped. Return
        (enqueued, skipped).

        Raises:
            RpcError: NOT_FOUND for an unknown workflow, stage or run (the runs of earlier calls
                stay enqueued).
        """
        enqueued = skipped = 0
        ids = iter(agent_run_ids)
        while batch := list(itertools.islice(ids, 1000)):
            response = self._call(
                self.orchestrator.EnqueueAgentRuns,
                orchestrator_pb.EnqueueAgentRunsRequest(
                    workflow=workflow, stage=stage, agent_run_ids=batch, priority=priority
                ),
            )
            enqueued += response.enqueued_count
            skipped += response.skipped_count
        return enqueued, skipped

    def list_collections(self) -> list[Collection]:
        """Return all collections with their run counts, oldest first."""
        response = self._call(self.ingestion.ListCollections, ingestion_pb.ListCollectionsRequest())
        return [Collection.from_proto(c) for c in response.collections]

    def apply_workflow(
        self, workflow: WorkflowSpec | workflow_pb2.Workflow, *, force: bool = False
    ) -> WorkflowApplied:
        """Create or replace a workflow (a `WorkflowSpec`, e.g. from `load_workflow`, or its wire
        form); a new version only if the definition changed. With `force`, the ready and leased
        tasks of stages the new definition drops are cancelled (`cancelled_count`).

        Raises:
            RpcError: INVALID_ARGUMENT naming the stage or pathway at fault; FAILED_PRECONDITION
                when the new definition drops a stage that holds ready or leased tasks (without
                `force`), naming each and its count.
        """
        message = workflow.to_proto() if isinstance(workflow, WorkflowSpec) else workflow
        response = self._call(
            self.orchestrator.ApplyWorkflow,
            orchestrator_pb.ApplyWorkflowRequest(workflow=message, force=force),
        )
        return WorkflowApplied(
            workflow=Workflow.from_proto(response.workflow),
            changed=response.changed,
            cancelled_count=response.cancelled_count,
        )

    def get_workflow(self, name: str) -> Workflow:
        """Return a workflow as stored (every stage's policy filled in)."""
        return Workflow.from_proto(
            self._call(
                self.orchestrator.GetWorkflow, orchestrator_pb.GetWorkflowRequest(name=name)
            ).workflow
        )

    def get_task(self, task_id: str | int) -> Task:
        """Return one task: its state, attempts, pathway, input and output (JSON-like values)
        and failed attempts."""
        return Task.from_proto(
            self._call(
                self.orchestrator.GetTask, orchestrator_pb.GetTaskRequest(task_id=str(task_id))
            ).task
        )

    def list_tasks(
        self, workflow: str, stage: str = "", state: TaskState | str | None = None
    ) -> list[Task]:
        """Return every task of a workflow (of one stage, in one state, if given), by id.

        Raises:
            ValueError: `state` names no `TaskState`.
        """
        wire = TaskState(state).to_proto() if state else workflow_pb2.TASK_STATE_UNSPECIFIED
        tasks: list[Task] = []
        token = ""
        while True:
            page = self._call(
                self.orchestrator.ListTasks,
                orchestrator_pb.ListTasksRequest(
                    workflow=workflow, stage=stage, state=wire, page_size=1000, page_token=token
                ),
            )
            tasks += [Task.from_proto(task) for task in page.tasks]
            token = page.next_page_token
            if not token:
                return tasks

    def redrive_tasks(
        self, workflow: str, stage: str = "", task_ids: list[str] | None = None
    ) -> int:
        """Send dead tasks back to ready (a stage's, or those named); return how many."""
        return self._call(
            self.orchestrator.RedriveTasks,
            orchestrator_pb.RedriveTasksRequest(
                workflow=workflow, stage=stage, task_ids=task_ids or []
            ),
        ).redriven_count

    def cancel_tasks(
        self, workflow: str, stage: str = "", task_ids: list[str] | None = None
    ) -> int:
        """Cancel ready, scheduled, leased or dead tasks (a stage's, or those named); return how
        many."""
        return self._call(
            self.orchestrator.CancelTasks,
            orchestrator_pb.CancelTasksRequest(
                workflow=workflow, stage=stage, task_ids=task_ids or []
            ),
        ).cancelled_count

    def backlog(self, workflow: str = "") -> list[StageBacklog]:
        """Return the backlog of every stage (of one workflow, if named)."""
        response = self._call(
            self.orchestrator.GetBacklog, orchestrator_pb.GetBacklogRequest(workflow=workflow)
        )
        return [StageBacklog.from_proto(stage) for stage in response.stages]

    def watch_run(self, agent_run_id: str, after_sequence: int = 0) -> Iterator[RunUpdate]:
        """The events of a live run as they land (after `after_sequence`), until it finishes:
        an update when events land, and one when its state changes (abandoned, running again).

        Raises:
            RpcError: NOT_FOUND for an unknown run, or the stream broke.
        """
        self._connect()
        request = ingestion_pb.WatchAgentRunRequest(
            agent_run_id=agent_run_id, after_sequence=after_sequence
        )
        with translate_rpc_errors():
            for response in self.ingestion.WatchAgentRun(request, metadata=self._metadata):
                yield RunUpdate.from_proto(response)

    def create_api_key(
        self,
        name: str,
        scopes: Iterable[str],
        *,
        collections: Iterable[str] = (),
        workflows: Iterable[str] = (),
        certificate_subject: str = "",
        expires_at: float | None = None,
    ) -> ApiKeyCreated:
        """Create an API key (needs an unlimited `admin` key); its `token` is shown this once. With `certificate_subject`, an entry admitting that client certificate; with
        `expires_at` (epoch seconds), a key every server refuses from then on."""
        key = key_pb.ApiKey(
            name=name,
            scopes=list(scopes),
            collections=list(collections),
            workflows=list(workflows),
            certificate_subject=certificate_subject,
        )
        if expires_at is not None:
            key.expire_time.FromNanoseconds(int(expires_at * 1e9))
        response = self._call(self.keys.CreateApiKey, key_pb.CreateApiKeyRequest(key=key))
        return ApiKeyCreated(key=ApiKey.from_proto(response.key), token=response.token)

    def list_api_keys(self) -> list[ApiKey]:
        """Every API key, revoked ones included (never their tokens)."""
        response = self._call(self.keys.ListApiKeys, key_pb.ListApiKeysRequest())
        return [ApiKey.from_proto(key) for key in response.keys]

    def revoke_api_key(self, name: str) -> ApiKey:
        """Revoke a key: every server refuses it within a second."""
        return ApiKey.from_proto(
            self._call(self.keys.RevokeApiKey, key_pb.RevokeApiKeyRequest(name=name)).key
        )
