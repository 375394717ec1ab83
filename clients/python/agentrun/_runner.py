"""`Runner`: stage workers with the surface of Encord's task Runner, over the Work stream.

    runner = Runner(workflow="grading")

    @runner.stage("triage")
    def triage(run: AgentRun) -> str | None:
        return "pass" if run.metadata.scores["reward"] > 0 else "fail"

    if __name__ == "__main__":
        runner.run()          # a CLI: --server, --workflow, --num-retries, --help, ...

The server pushes leased tasks (no polling); the function's return value is the pathway. None
completes the task with no pathway, which ends the run's pass through the workflow at a terminal
stage; at a stage that has pathways, None (like any name the stage lacks) fails the task for good,
with the valid pathways in the error: it never loops. A function that raises fails the attempt:
the server retries it with backoff, up to `num_retries` retries, then the task is dead. One failing
task never stops the others. Unlike Encord's Runner, tasks are leased (no two workers run the same
task at once), leases of long tasks are extended in the background, and retries survive restarts.
A function may also return `StageResult(pathway, output)`: the JSON-like output is stored with the
task and becomes the next stage's input (at most 1 MiB encoded: a larger one fails the task for
good, as an unknown pathway does).

A task cancelled while it runs (`agentrun tasks cancel`, `Client.cancel_tasks`), or whose lease the
server took back on expiry, is stopped: an async function is cancelled, a sync one runs on but its
result is dropped (`RunSummary.revoked`).

SIGTERM or SIGINT drains: tasks not yet started go back to the server at once (costing no attempt),
tasks running get `drain_grace_seconds` to finish, then are handed back too, and the run ends with
exit code 0. As a program (`runner.run()`), it exits 3 (`EXIT_TASKS_DEAD`) when tasks it worked
ended dead, 1 on an error, else 0.

The protocol itself (credits, batched settles, extensions, reconnect and resume) is `WorkStream`'s:
a server that restarts or a connection that breaks does not stop the stage functions; their
leases are resumed on the next stream and settled there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import inspect
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentrun import _metrics
from agentrun._client import Client
from agentrun._connection import (
    Connection,
    add_connection_arguments,
    connection_from_arguments,
    connection_of,
)
from agentrun._convert import value_to_proto
from agentrun._errors import WorkflowError
from agentrun._progress import StageProgress, print_summary
from agentrun._records import Workflow
from agentrun._stage import (
    Fail,
    Retry,
    StageFunction,
    StageResult,
    StageReturn,
    arguments,
    parameters,
)
from agentrun._thread_calls import ThreadCalls
from agentrun.v1 import agent_run_pb2
from agentrun.wire.limits import MAX_OUTPUT_BYTES, value_depth_problem
from agentrun.work import Lease, WorkStream

_log = logging.getLogger(__name__)


def _from_project_hash(workflow: str | None, project_hash: str | None) -> str | None:
    """Encord's `project_hash` taken as the workflow (code ported by search-and-replace keeps
    working), with a notice once per process.

    Raises:
        WorkflowError: both are given and differ.
    """
    if project_hash is None:
        return workflow
    if workflow and workflow != project_hash:
        raise WorkflowError(
            f"project_hash={project_hash!r} and workflow={workflow!r}: give the workflow only"
        )
    global _told_project_hash
    if not _told_project_hash:
        _told_project_hash = True
        _log.warning(
            "project_hash is Encord's; agentrun takes %r as the workflow name (say workflow=)",
            project_hash,
        )
    return project_hash


_told_project_hash = False

DRAIN_GRACE_SECONDS = 30.0
EXIT_TASKS_DEAD = 3
"""`Runner.run`'s exit code when tasks it worked ended dead (dead letters), so that CI can tell;
0: every task it took was done (or handed back); 1: an error stopped it; 2: bad arguments."""
PROGRESS_REFRESH_SECONDS = 0.25
DEFAULT_CONCURRENCY = 16
"""Stage functions run at once when neither `concurrency` nor `task_batch_size` is given."""
PREFETCH_MULTIPLIER = 2
"""Default credits per concurrency slot."""
START_CHUNK = 32
"""Leases of one batch started per event-loop turn (see `_Execution.run`)."""


@dataclass
class RunSummary:
    """What a Runner did: completions per (stage, pathway), failed attempts, dead tasks."""

    completed: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Tasks done, by (stage, pathway); "" is the end of the workflow."""
    failed: Counter[str] = field(default_factory=Counter)
    """Failed attempts, by stage (retried by the server while attempts remain)."""
    dead: Counter[str] = field(default_factory=Counter)
    """Tasks this runner gave up on for good, by stage."""
    handed_back: Counter[str] = field(default_factory=Counter)
    """Leases returned unfinished when draining, by stage (ready again, no attempt spent)."""
    revoked: Counter[str] = field(default_factory=Counter)
    """Leases the server took back (the task cancelled, or the lease expired), by stage: their
    stage functions were cancelled (async) or their results dropped (sync)."""
    retried: Counter[str] = field(default_factory=Counter)
    """Tasks a stage function asked to run again later (`Retry`), by stage: no attempt spent."""

    def __str__(self) -> str:
        lines = [
            f"  {stage}: {n} done via {pathway or '(end)'}"
            for (stage, pathway), n in sorted(self.completed.items())
        ]
        lines += [f"  {stage}: {n} failed attempts" for stage, n in sorted(self.failed.items())]
        lines += [f"  {stage}: {n} dead" for stage, n in sorted(self.dead.items())]
        lines += [f"  {stage}: {n} handed back" for stage, n in sorted(self.handed_back.items())]
        lines += [f"  {stage}: {n} taken back" for stage, n in sorted(self.revoked.items())]
        lines += [f"  {stage}: {n} to retry later" for stage, n in sorted(self.retried.items())]
        return "runner summary:\n" + ("\n".join(lines) if lines else "  no tasks")


class Runner:
    """Runs stage functions on the tasks of a workflow.

    Args:
        workflow: The workflow's name (also settable per call and by --workflow).
        server_url: The orchestrator (`host:port`, `grpcs://host:port`); None uses the
            connection's, else $AGENTRUN_SERVER, else 127.0.0.1:50051.
        api_key: Sent as `authorization: Bearer <key>` on every call (a server run with
            `--auth keys` needs one with the `work` scope); None uses the connection's, else
            $AGENTRUN_API_KEY.
        connection: TLS, client certificate, metadata, keepalive (see `Connection`); None: from
            the environment.
        validate: Fetch the workflow now, so that an unreachable server or an unknown workflow
            fails here, and each `@runner.stage(...)` naming a stage the workflow lacks fails as
            it is registered (Encord's Runner checks its project at construction). Otherwise the
            stages are checked when the Runner starts.
        worker: This worker's name in the server's logs and in each task's history (the lease
            holder the console and `agentrun tasks show` name), e.g. "grader@gpu-3"; None:
            "<host>/pid-<pid>".

    Raises:
        RpcError: with `validate`, the server is unreachable or has no such workflow.
        WorkflowError: with `validate`, no workflow named.
    """

    def __init__(
        self,
        workflow: str | None = None,
        server_url: str | None = None,
        *,
        api_key: str | None = None,
        connection: Connection | None = None,
        validate: bool = False,
        project_hash: str | None = None,
        worker: str | None = None,
    ) -> None:
        workflow = _from_project_hash(workflow, project_hash)
        self.workflow = workflow
        self.worker = worker
        self.server_url = server_url
        self.api_key = api_key
        self.connection = connection_of(server_url, api_key, connection)
        self._stages: dict[str, StageFunction] = {}
        self._parameters: dict[str, list[str]] = {}  # stage -> what each parameter asks for
        self._definition: Workflow | None = None
        if validate:
            if not workflow:
                raise WorkflowError("validate=True needs a workflow: pass workflow= to Runner(...)")
            with Client(connection=self.connection) as client:
                self._definition = client.get_workflow(workflow)

    def stage(
        self, stage: str, *, overwrite: bool = False
    ) -> Callable[[StageFunction], StageFunction]:
        """Register the decorated function for a stage. It gets what its parameters ask for by
        annotation (`AgentRun`, `TaskContext`, `TaskInput`; a lone unannotated parameter gets the
        run) and returns a pathway, `StageResult`, `Retry` or `Fail` (see `agentrun._stage`).

        The function may be sync (run in a thread pool) or async. It is returned unchanged.

        Raises:
            WorkflowError: the stage already has a function (pass overwrite=True to replace it),
                a parameter asks for nothing the Runner gives, or (with `validate`) the workflow
                has no such stage.
        """

        def register(function: StageFunction) -> StageFunction:
            if stage in self._stages and not overwrite:
                raise WorkflowError(f"stage {stage!r} already has a function; pass overwrite=True")
            if self._definition is not None:
                self._check_stages(self._definition, [stage])
            self._parameters[stage] = parameters(function, stage)
            self._stages[stage] = function
            return function

        return register

    def __call__(
        self,
        *,
        workflow: str | None = None,
        server_url: str | None = None,
        refresh_every: int | None = None,
        num_retries: int = 3,
        task_batch_size: int | None = None,
        max_tasks_per_stage: int | None = None,
        concurrency: int | None = None,
        drain_grace_seconds: float = DRAIN_GRACE_SECONDS,
        progress: bool = False,
        project_hash: str | None = None,
    ) -> RunSummary:
        """Work tasks of the registered stages.

        Args:
            workflow: Overrides the constructor's workflow.
            server_url: Overrides the constructor's server.
            refresh_every: None: exit once the stages are empty. Otherwise keep serving until
                interrupted (tasks are pushed as they become ready), logging progress every
                `refresh_every` seconds.
            num_retries: Retries of a failing task (capped by the stage's max_attempts).
            task_batch_size: Tasks held at once (the stream's credits: running, or leased and
                waiting for a free slot). None: twice `concurrency`, so that a slot that frees
                finds its next task here (prefetch, as Celery's multiplier; kept small: a task
                held here waits while another worker might be idle).
            max_tasks_per_stage: Stop taking tasks of a stage after this many.
            concurrency: Stage functions running at once (sync ones each on a thread of its
                own). None: `task_batch_size` if given, else `DEFAULT_CONCURRENCY` (16).
            drain_grace_seconds: On SIGTERM/SIGINT, how long running tasks may finish before
                their leases are handed back.
            progress: Show live progress per stage (rich) on a terminal.
            project_hash: Encord's name for the workflow, taken as `workflow` with a notice.

        While it runs, the objects alive at its start are left out of the garbage collector's
        full passes (`gc.freeze`; unfrozen on return): with many leases held, those passes
        stopped the event loop for a tenth of a second every few seconds.

        Raises:
            WorkflowError: no stage registered, no workflow named, or a registered stage is not in
                the workflow (the message lists the workflow's stages).
            RpcError: the server is unreachable.
        """
        workflow = _from_project_hash(workflow, project_hash) or self.workflow
        connection = self.connection.with_overrides(server_url=server_url)
        if not workflow:
            raise WorkflowError("no workflow: pass workflow= to Runner(...) or --workflow")
        if not self._stages:
            raise WorkflowError("no stage registered: decorate a function with @runner.stage(...)")
        if concurrency is None:
            concurrency = DEFAULT_CONCURRENCY if task_batch_size is None else task_batch_size
        if task_batch_size is None:
            task_batch_size = PREFETCH_MULTIPLIER * concurrency
        if (
            task_batch_size < 1
            or num_retries < 0
            or (max_tasks_per_stage or 1) < 1
            or concurrency < 1
        ):
            raise WorkflowError(
                "task_batch_size, max_tasks_per_stage and concurrency must be >= 1, "
                "num_retries >= 0"
            )
        with Client(connection=connection) as client:
            definition = client.get_workflow(workflow)
        self._check_stages(definition)
        execution = _Execution(
            self._stages,
            self._parameters,
            definition,
            connection,
            num_retries,
            task_batch_size,
            max_tasks_per_stage,
            refresh_every,
            concurrency,
            drain_grace_seconds,
            progress,
            self.worker,
        )
        with _frozen_heap():
            return asyncio.run(execution.run())

    def _check_stages(self, workflow: Workflow, stages: Sequence[str] | None = None) -> None:
        names = [s.name for s in workflow.stages]
        unknown = [s for s in (self._stages if stages is None else stages) if s not in names]
        if unknown:
            raise WorkflowError(
                f"stage(s) {', '.join(repr(s) for s in unknown)} not in workflow "
                f"{workflow.name!r}; its stages are: {', '.join(repr(n) for n in names)}"
            )

    def run(self, argv: Sequence[str] | None = None) -> None:
        """Run as a command-line program (the options mirror `__call__`). Exits 0 when every task
        it took was done or handed back, `EXIT_TASKS_DEAD` (3) when some ended dead (dead letters:
        CI can tell), 1 when an error stopped it, 2 on bad arguments."""
        parser = argparse.ArgumentParser(
            description="Work the tasks of this script's stages on an agentrun orchestrator."
        )
        add_connection_arguments(parser, self.connection.server_url)
        parser.add_argument("--workflow", default=self.workflow, help="workflow name")
        parser.add_argument(
            "--project-hash", help="Encord's name for --workflow: taken as the workflow"
        )
        parser.add_argument(
            "--refresh-every",
            type=int,
            default=None,
            help="keep serving, logging progress every N seconds; unset: exit once the stages are empty",
        )
        parser.add_argument(
            "--num-retries", type=int, default=3, help="retries of a failing task [default: 3]"
        )
        parser.add_argument(
            "--task-batch-size",
            type=int,
            default=None,
            help="tasks held at once [default: twice --concurrency]",
        )
        parser.add_argument(
            "--max-tasks-per-stage",
            type=int,
            default=None,
            help="stop taking a stage's tasks after this many [default: no limit]",
        )
        parser.add_argument(
            "--concurrency",
            type=int,
            default=None,
            help="stage functions running at once [default: --task-batch-size if given, else 16]",
        )
        parser.add_argument(
            "--drain-grace-seconds",
            type=float,
            default=DRAIN_GRACE_SECONDS,
            help="on SIGTERM/SIGINT, how long running tasks may finish [default: 30]",
        )
        parser.add_argument(
            "--worker",
            default=self.worker,
            help="this worker's name in task histories and server logs [default: HOST/pid-PID]",
        )
        parser.add_argument(
            "--no-progress",
            action="store_true",
            help="no live progress display (it shows only on a terminal anyway)",
        )
        args = parser.parse_args(argv)
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        try:
            self.connection = connection_from_arguments(args, self.connection)
            self.worker = args.worker
            summary = self(
                workflow=_from_project_hash(
                    None if args.project_hash else args.workflow, args.project_hash
                ),
                refresh_every=args.refresh_every,
                num_retries=args.num_retries,
                task_batch_size=args.task_batch_size,
                max_tasks_per_stage=args.max_tasks_per_stage,
                concurrency=args.concurrency,
                drain_grace_seconds=args.drain_grace_seconds,
                progress=not args.no_progress,
            )
        except Exception as exc:
            parser.exit(1, f"error: {exc}\n")
        print_summary(summary)
        parser.exit(EXIT_TASKS_DEAD if any(summary.dead.values()) else 0)


class _Execution:
    """One run of a Runner: its stage functions on the leases of a `WorkStream`, until done."""

    def __init__(
        self,
        stages: dict[str, StageFunction],
        parameters: dict[str, list[str]],
        workflow: Workflow,
        connection: Connection,
        num_retries: int,
        credits: int,
        max_tasks_per_stage: int | None,
        refresh_every: int | None,
        concurrency: int,
        drain_grace_seconds: float,
        progress: bool,
        worker: str | None,
    ) -> None:
        self.stages = stages
        self.is_async = {s: inspect.iscoroutinefunction(f) for s, f in stages.items()}
        self.parameters = parameters
        self.workflow_name = workflow.name
        self.pathways = {s.name: list(s.pathways) for s in workflow.stages}
        self.num_retries = num_retries
        self.refresh_every = refresh_every
        self.drain_grace_seconds = drain_grace_seconds
        self.summary = RunSummary()
        self.stream = WorkStream(
            connection,
            workflow.name,
            list(stages),
            credits,
            max_tasks_per_stage=max_tasks_per_stage,
            notify_when_empty=refresh_every is None,
            on_revoked=self._on_revoked,
            worker=worker,
        )
        self.progress = (
            StageProgress(list(stages), self.summary, self.stream.held) if progress else None
        )
        self.threads = ThreadCalls(concurrency, "agentrun-stage")
        self.stopping = asyncio.Event()  # a signal came: drain
        self.slots = asyncio.Semaphore(concurrency)
        # Metric children looked up once: `labels()` takes a lock and builds a key per call.
        self.seconds_of = {s: _metrics.RUNNER_TASK_SECONDS.labels(s) for s in stages}
        self.outcomes = {
            (s, o): _metrics.RUNNER_TASKS.labels(s, o)
            for s in stages
            for o in ("done", "failed", "retried")
        }
        self.work: dict[str, asyncio.Task[None]] = {}  # task id -> its work, to cancel it

    async def run(self) -> RunSummary:
        """Work every lease the stream hands out; on a signal, drain. Returns the summary.

        Raises:
            RpcError: the orchestrator refused the stream for good.
        """
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self._on_signal)
        helpers = [asyncio.create_task(self._drain_on_signal())]
        if self.progress is not None:
            helpers.append(asyncio.create_task(self._show_progress()))
        if self.refresh_every:
            helpers.append(asyncio.create_task(self._log_progress()))
        try:
            started = 0
            async with self.stream:
                async for lease in self.stream:
                    task = asyncio.create_task(self._work(lease))
                    self.work[lease.task_id] = task
                    task.add_done_callback(functools.partial(_forget, self.work, lease.task_id))
                    started += 1
                    if started % START_CHUNK == 0:
                        # A loop turn between chunks of a big lease batch: the first chunk's
                        # settles go out while the rest work, and the server leases the next
                        # tasks meanwhile (without it, a batch of quick tasks settles as one and
                        # each side waits on the other).
                        await asyncio.sleep(0)
                # Nothing is held: what still runs is settling up; let it finish.
                await asyncio.gather(*self.work.values(), return_exceptions=True)
        finally:
            for helper in helpers:
                helper.cancel()
            for task in list(self.work.values()):
                task.cancel()
            await asyncio.gather(*helpers, *self.work.values(), return_exceptions=True)
            self.threads.shutdown()
        return self.summary

    def _on_signal(self) -> None:
        _log.info(
            "signal received: draining (unstarted tasks go back now; running ones get %.0f s)",
            self.drain_grace_seconds,
        )
        self.stopping.set()

    async def _drain_on_signal(self) -> None:
        """On a signal: no more leases; tasks not started go back at once (they are waiting for
        a slot, which the drain denies them); running ones get the grace, then go back too."""
        await self.stopping.wait()
        self.stream.drain()
        await asyncio.sleep(self.drain_grace_seconds)
        running = [task for task in self.work.values() if not task.done()]
        if running:
            _log.warning("drain grace over: handing back %d running tasks", len(running))
            for task in running:
                task.cancel()

    def _on_revoked(self, lease: Lease, reason: str) -> None:
        """Stop working on a task whose lease the server took back; it is not settled."""
        self.summary.revoked[lease.stage] += 1
        _log.warning(
            "task %s (%s): the server took its lease back (%s); stopping it",
            lease.task_id,
            lease.stage,
            reason,
        )
        work = self.work.get(lease.task_id)
        if work is not None:
            work.cancel()

    async def _show_progress(self) -> None:
        assert self.progress is not None
        if not self.progress.start():
            return
        try:
            while True:
                self.progress.refresh()
                await asyncio.sleep(PROGRESS_REFRESH_SECONDS)
        finally:
            self.progress.stop()

    async def _log_progress(self) -> None:
        assert self.refresh_every
        while True:
            await asyncio.sleep(self.refresh_every)
            done = sum(self.summary.completed.values())
            _log.info(
                "progress: %d done, %d failed attempts, %d dead",
                done,
                sum(self.summary.failed.values()),
                sum(self.summary.dead.values()),
            )

    async def _work(self, lease: Lease) -> None:
        started = False
        try:
            if not await self._take_slot():
                self._hand_back(lease, "draining before it started")
                return
            started = True
            _metrics.RUNNER_TASKS_IN_FLIGHT.inc()
            outcome = await self._work_on(lease)
            self.outcomes[lease.stage, outcome].inc()
        except asyncio.CancelledError:
            if self.stream.holds(lease):  # not revoked: the drain's grace ended
                self._hand_back(lease, "drain grace over")
            raise
        finally:
            if started:
                _metrics.RUNNER_TASKS_IN_FLIGHT.dec()
                self.slots.release()

    async def _take_slot(self) -> bool:
        """Wait for a free concurrency slot; False if draining begins first (hand the task back)."""
        if self.stopping.is_set():
            return False
        if not self.slots.locked():  # a slot is free: taken without yielding, nothing to race
            await self.slots.acquire()
            return True
        acquire = asyncio.ensure_future(self.slots.acquire())
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # revoked or drained while waiting: keep no slot
            if acquire.done() and not acquire.cancelled():
                self.slots.release()
            raise
        finally:
            stop.cancel()
            if not acquire.done():
                acquire.cancel()
        if acquire.done() and not acquire.cancelled():
            if not self.stopping.is_set():
                return True
            self.slots.release()
        return False

    def _hand_back(self, lease: Lease, why: str) -> None:
        self.summary.handed_back[lease.stage] += 1
        _log.info("task %s (%s) handed back: %s", lease.task_id, lease.stage, why)
        self.stream.release(lease)

    def _give_up(self, lease: Lease, message: str) -> str:
        _log.error("task %s: %s", lease.task_id, message)
        self.summary.dead[lease.stage] += 1
        self.stream.fail(lease, message, non_retryable=True)
        return "failed"

    async def _work_on(self, lease: Lease) -> str:
        """Run the stage function on one task and settle it; return done, failed or retried."""
        stage = lease.stage
        started = time.monotonic()
        try:
            args = arguments(self.parameters[stage], lease, self.workflow_name)
            try:
                result = await self._call(stage, args)
            finally:
                self.seconds_of[stage].observe(time.monotonic() - started)
            if isinstance(result, Retry):
                return self._retry_later(lease, result)
            if isinstance(result, Fail):
                if not result.retryable:
                    return self._give_up(lease, result.reason)
                raise _Failed(result.reason)
            if isinstance(result, StageResult):
                pathway, output = result.pathway or "", result.output
            else:
                pathway, output = result or "", None
            encoded = None
            if output is not None:
                problem = value_depth_problem(output)
                if problem is not None:  # deterministic: another attempt returns the same
                    return self._give_up(lease, f"stage function returned an output {problem}")
                encoded = agent_run_pb2.Value()
                value_to_proto(output, encoded)
        except Exception as exc:
            final = lease.attempt > self.num_retries or lease.attempt >= lease.max_attempts
            _log.error(
                "stage %s task %s attempt %d/%d failed%s",
                stage,
                lease.task_id,
                lease.attempt,
                min(lease.max_attempts, self.num_retries + 1),
                "; giving up" if final else "",
                exc_info=None if isinstance(exc, _Failed) else exc,
            )
            self.summary.failed[stage] += 1
            if final:
                self.summary.dead[stage] += 1
            message = str(exc) if isinstance(exc, _Failed) else f"{type(exc).__name__}: {exc}"
            self.stream.fail(lease, message, non_retryable=final)
            return "failed"
        valid = self.pathways[stage]
        if (valid and pathway not in valid) or (not valid and pathway):
            return self._give_up(
                lease,
                f"stage function returned pathway {pathway or None!r}; stage {stage!r} has "
                + (
                    f"pathways {', '.join(repr(p) for p in valid)}"
                    if valid
                    else "no pathways (return None)"
                ),
            )
        if encoded is not None and encoded.ByteSize() > MAX_OUTPUT_BYTES:
            return self._give_up(
                lease,
                f"stage function returned an output of {encoded.ByteSize():,} bytes "
                f"encoded, over the server's {MAX_OUTPUT_BYTES:,}-byte limit: store large results "
                "elsewhere and return a reference",
            )
        self.summary.completed[(stage, pathway)] += 1
        _log.debug(
            "task %s done via %r in %.3f s", lease.task_id, pathway, time.monotonic() - started
        )
        self.stream.complete(lease, pathway, encoded)
        return "done"

    def _retry_later(self, lease: Lease, retry: Retry) -> str:
        self.summary.retried[lease.stage] += 1
        _log.info("task %s (%s): to run again in %.1f s", lease.task_id, lease.stage, retry.after)
        self.stream.release(lease, after_seconds=max(0.0, retry.after))
        return "retried"

    async def _call(self, stage: str, args: list[Any]) -> StageReturn:
        function = self.stages[stage]
        if self.is_async[stage]:
            return await function(*args)  # type: ignore[misc,no-any-return]
        result: StageReturn = await self.threads.call(function, *args)
        if inspect.isawaitable(result):
            result = await result
        return result


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Leave the objects alive as the Runner starts (imported libraries, the caller's setup) out
    of the garbage collector's full passes while it runs (`gc.freeze`), as pre-forking servers
    do. With a thousand leases held, each task's objects live long enough to reach the oldest
    generation, so a full pass came every few seconds and walked the whole heap with the event
    loop stopped: 65-133 ms (measured, five Runners of 1,000 leases each; every settle and ack
    waited meanwhile), at most 45 ms frozen. Garbage of before is collected first; the heap is
    unfrozen when the Runner returns."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class _Failed(Exception):
    """A stage function's `Fail(reason, retryable=True)`: failed as an exception would."""


def _forget(work: dict[str, asyncio.Task[None]], task_id: str, task: asyncio.Task[None]) -> None:
    if work.get(task_id) is task:
        del work[task_id]
