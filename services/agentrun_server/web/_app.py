"""The console's pages and actions, as a Starlette application over `Calls`.

Pages: home (collections, workflows' backlog), a collection's runs (newest first, by cursor,
filtered), a run (its transcripts, metadata, scores, its tasks; a live run grows over server-sent
events), a workflow (its stages as a graph, backlog, dead letters with Redrive and Cancel), a
stage's tasks, a task. Every answer carries a strict Content-Security-Policy: only the console's
own scripts and styles run, and run-supplied text is only ever escaped text."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import grpc
import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentrun.v1 import agent_run_pb2 as run_pb
from agentrun.v1 import ingestion_service_pb2 as ingest
from agentrun.v1 import orchestrator_service_pb2 as orch
from agentrun.v1 import workflow_pb2 as wf
from agentrun.wire.filters import parse_filters
from agentrun_server._errors import ServerError
from agentrun_server.auth import ANYONE, METHOD_SCOPES, KeyRing, Principal
from agentrun_server.web import _views as views
from agentrun_server.web._calls import CallFailed, Calls
from agentrun_server.web._sessions import COOKIE, IDLE_SECONDS, Session, Sessions

HERE = Path(__file__).parent
RUNS_PER_PAGE = 50
TASKS_PER_PAGE = 50
KEEPALIVE_SECONDS = 15.0

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "font-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ]
)
_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]

_REDRIVE = METHOD_SCOPES["/agentrun.v1.OrchestratorService/RedriveTasks"]
_CANCEL = METHOD_SCOPES["/agentrun.v1.OrchestratorService/CancelTasks"]


class _SecurityHeaders:
    """Adds the CSP and its companions to every HTTP answer (static files too)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


class _SignIn(Exception):
    """The visitor must sign in (again): `why` says why, shown on the form."""

    def __init__(self, why: str = "") -> None:
        self.why = why


@dataclass
class Visitor:
    session: Session
    principal: Principal
    new_cookie: bool

    @property
    def token(self) -> str | None:
        return self.session.token

    def may(self, scopes: tuple[str, ...]) -> bool:
        return not self.principal.scopes.isdisjoint(scopes)


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every template, whatever its name: run text is hostile
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["visible"] = views.visible
    env.filters["part"] = lambda text: quote(str(text), safe="")
    env.globals["RUN_STATES"] = views.RUN_STATES
    env.globals["TASK_STATES"] = views.TASK_STATES
    env.globals["when"] = views.when
    env.globals["age"] = views.age
    env.globals["as_json"] = views.as_json
    env.globals["value"] = views.value
    env.globals["oob"] = False  # a fragment swapped out of band (`{% set oob = True %}`)
    return env


FOLD_CHARS = 2_000
"""Text longer than this shows its start; the rest opens on a click (<details>)."""
MESSAGES_PER_PAGE = 100
"""Messages of a transcript a run page shows at first; the next as many load as the reader
scrolls to them (a 50 MB run's page paints its first messages at once)."""
CAUGHT_UP_SECONDS = 0.5
"""A watch that sends nothing for this long after its first answer has sent its stored events."""


class ConsoleApp:
    """The console's ASGI application (`asgi`), reading and acting through `calls` as the
    signed-in key; `keys` None means `--auth none` (every visitor acts as the server's
    unauthenticated caller)."""

    def __init__(self, calls: Calls, keys: KeyRing | None, services: tuple[str, ...]) -> None:
        self._calls = calls
        self._keys = keys
        self._services = services
        self._sessions = Sessions()
        self._env = _templates()
        self._env.globals["FOLD_CHARS"] = FOLD_CHARS
        self.stopping = asyncio.Event()
        routes = [
            Route("/", self.home),
            Route("/partials/home", self.home_tables),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/collections/{name:path}", self.collection),
            Route("/runs/{run_id:path}", self.run),
            Route("/live/{run_id:path}", self.live),
            Route("/messages/{run_id:path}", self.messages),
            Route("/history/{run_id:path}", self.history),
            Route("/summary/{run_id:path}", self.summary),
            Route("/workflows/{name}/tasks", self.tasks),
            Route("/workflows/{name}/redrive", self.redrive, methods=["POST"]),
            Route("/workflows/{name}/cancel", self.cancel, methods=["POST"]),
            Route("/workflows/{name}", self.workflow),
            Route("/tasks/{task_id}", self.task),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        app = Starlette(routes=routes, exception_handlers={404: self._not_found})
        self.asgi: ASGIApp = _SecurityHeaders(app)

    # --- who is visiting ------------------------------------------------------------------------

    def _visit(self, request: Request) -> Visitor:
        """The visitor's session (a new one when the cookie names none) and principal.

        Raises:
            _SignIn: `--auth keys` and no key signed in, or it was revoked or expired.
        """
        session = self._sessions.get(request.cookies.get(COOKIE))
        if self._keys is None:
            if session is None:
                return Visitor(self._sessions.new(), ANYONE, True)
            return Visitor(session, ANYONE, False)
        if session is None or session.token is None:
            raise _SignIn()
        try:
            principal = self._keys.authenticate(session.token)
        except ServerError as exc:
            session.token = None
            raise _SignIn(str(exc)) from None
        return Visitor(session, principal, False)

    def _check_csrf(self, request: Request, visitor: Visitor, form: dict[str, str]) -> None:
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            raise Refused(403, f"origin {origin!r} is not this console's")
        presented = request.headers.get("x-csrf-token") or form.get("csrf")
        if not visitor.session.csrf_ok(presented):
            raise Refused(403, "the form's CSRF token is missing or stale: reload the page")

    # --- answers --------------------------------------------------------------------------------

    def _cookie(self, response: Response, session: Session, request: Request) -> None:
        response.set_cookie(
            COOKIE,
            session.id,
            max_age=IDLE_SECONDS,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )

    def _render(
        self,
        request: Request,
        visitor: Visitor | None,
        template: str,
        status: int = 200,
        streamed: bool = False,
        **context: Any,
    ) -> Response:
        context.setdefault("visitor", visitor)
        context.setdefault("signed_in", self._keys is not None and visitor is not None)
        context.setdefault("csrf", visitor.session.csrf if visitor else "")
        context.setdefault("path", request.url.path)
        response: Response
        if streamed:
            # Sent as it renders, so a browser paints the first messages of a long page
            # before the last are written.
            pieces = self._env.get_template(template).generate(**context)
            response = StreamingResponse(
                _chunked(pieces), status_code=status, media_type="text/html; charset=utf-8"
            )
        else:
            body = self._env.get_template(template).render(**context)
            response = HTMLResponse(body, status_code=status)
        if visitor is not None and visitor.new_cookie:
            self._cookie(response, visitor.session, request)
        return response

    def _failed(
        self, request: Request, visitor: Visitor | None, status: int, message: str
    ) -> Response:
        return self._render(request, visitor, "error.html", status, code=status, message=message)

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return self._failed(request, None, 404, f"no page at {request.url.path}")

    async def _answer(
        self, request: Request, page: Callable[[Visitor], Awaitable[Response]]
    ) -> Response:
        """Run a page as its visitor; a refused call becomes an error page with the server's
        message (its HTTP status from `_calls.HTTP_STATUS`), a missing sign-in the form."""
        try:
            visitor = self._visit(request)
        except _SignIn as exc:
            target = "/login?" + urlencode(
                {"next": _local(request.url.path, request.url.query), "why": exc.why}
            )
            if request.headers.get("hx-request"):
                return Response(status_code=401, headers={"HX-Redirect": target})
            return RedirectResponse(target, status_code=303)
        try:
            return await page(visitor)
        except CallFailed as exc:
            if exc.http_status == 401:
                visitor.session.token = None
            return self._failed(request, visitor, exc.http_status, exc.message)
        except Refused as exc:
            return self._failed(request, visitor, exc.status, exc.message)

    # --- sign in and out ------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        session = self._sessions.get(request.cookies.get(COOKIE))
        new = session is None
        if session is None:
            session = self._sessions.new()
        visitor = Visitor(session, ANYONE, new)
        target = _local(request.query_params.get("next", "/"))
        if self._keys is None:
            return RedirectResponse(target, status_code=303)
        why = request.query_params.get("why", "")
        if request.method == "POST":
            form = await _form(request)
            target = _local(form.get("next", "/"))
            try:
                self._check_csrf(request, visitor, form)
            except Refused as exc:
                return self._failed(request, visitor, exc.status, exc.message)
            token = form.get("api_key", "").strip()
            try:
                self._keys.authenticate(token or None)
            except ServerError as exc:
                why = str(exc)
            else:
                session.token = token
                fresh = self._sessions.renew(session)
                response = RedirectResponse(target, status_code=303)
                self._cookie(response, fresh, request)
                return response
        return self._render(
            request,
            visitor,
            "login.html",
            401 if why else 200,
            next=target,
            why=why,
            signed_in=False,
        )

    async def logout(self, request: Request) -> Response:
        session = self._sessions.get(request.cookies.get(COOKIE))
        if session is not None:
            form = await _form(request)
            if not session.csrf_ok(request.headers.get("x-csrf-token") or form.get("csrf")):
                return self._failed(request, None, 403, "the form's CSRF token is missing or stale")
            self._sessions.end(session)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # --- home -----------------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        async def page(visitor: Visitor) -> Response:
            return self._render(request, visitor, "home.html", **await self._overview(visitor))

        return await self._answer(request, page)

    async def home_tables(self, request: Request) -> Response:
        async def page(visitor: Visitor) -> Response:
            return self._render(request, visitor, "_overview.html", **await self._overview(visitor))

        return await self._answer(request, page)

    async def _overview(self, visitor: Visitor) -> dict[str, Any]:
        collections: list[Any] | None = None
        workflows: list[tuple[Any, list[Any]]] | None = None
        if "ingestion" in self._services:
            collections = list((await self._calls.list_collections(visitor.token)).collections)
        if "orchestrator" in self._services:
            listed = (await self._calls.list_workflows(visitor.token)).workflows
            backlogs = await asyncio.gather(
                *(self._calls.backlog(visitor.token, w.name) for w in listed)
            )
            workflows = [(w, list(b.stages)) for w, b in zip(listed, backlogs, strict=True)]
        return {"collections": collections, "workflows": workflows}

    # --- a collection's runs --------------------------------------------------------------------

    async def collection(self, request: Request) -> Response:
        name = request.path_params["name"]
        params = request.query_params
        state = params.get("state", "")
        wheres = [w for w in params.getlist("where") if w.strip()]

        async def page(visitor: Visitor) -> Response:
            found = await self._calls.get_collection(visitor.token, name=name)
            states = {v: k for k, v in views.RUN_STATES.items()}
            problem = ""
            runs: list[Any] = []
            next_page = ""
            try:
                filters = parse_filters(wheres)
                if state and state not in states:
                    raise ValueError(f"state {state!r}: choose running, finished or abandoned")
            except ValueError as exc:
                problem = str(exc)
            else:
                request_ = ingest.ListAgentRunsRequest(
                    collection_id=found.id,
                    page_size=RUNS_PER_PAGE,
                    page_token=params.get("page", ""),
                    view=ingest.AGENT_RUN_VIEW_BASIC,
                    state=states.get(state, 0),  # type: ignore[arg-type]
                    filters=filters,
                    newest_first=True,
                )
                try:
                    listed = await self._calls.list_runs(visitor.token, request_)
                except CallFailed as exc:
                    if exc.http_status != 400:
                        raise
                    problem = exc.message
                else:
                    runs = list(listed.agent_runs)
                    next_page = listed.next_page_token
            query = [("state", state)] if state else []
            query += [("where", w) for w in wheres]
            return self._render(
                request,
                visitor,
                "collection.html",
                400 if problem else 200,
                collection=found,
                runs=runs,
                state=state,
                wheres=wheres,
                problem=problem,
                next_url=(
                    f"{request.url.path}?{urlencode([*query, ('page', next_page)])}"
                    if next_page
                    else ""
                ),
                first_url=f"{request.url.path}?{urlencode(query)}" if params.get("page") else "",
                scores=views.scores,
            )

        return await self._answer(request, page)

    # --- a run ----------------------------------------------------------------------------------

    async def run(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]

        async def page(visitor: Visitor) -> Response:
            try:
                stored = await self._calls.get_run(visitor.token, run_id)
            except CallFailed as exc:
                if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                # Over the server's message limit (a live run grown past it): its first events
                # at once, its summary as soon as they are on the page (it decodes the whole
                # run), the next events as the reader scrolls to them.
                first = run_pb.AgentRun(id=run_id)
                last = await self._read_events(visitor.token, run_id, 0, None, first)
                transcripts = views.transcripts(first)
                return self._render(
                    request,
                    visitor,
                    "run.html",
                    streamed=True,
                    run=first,
                    collection=None,
                    transcripts=transcripts,
                    summary_url=f"/summary/{quote(run_id, safe='')}?"
                    + urlencode({"after": last, "known": ",".join(t.element for t in transcripts)}),
                )
            transcripts = views.transcripts(stored.agent_run, MESSAGES_PER_PAGE)
            return self._render(
                request,
                visitor,
                "run.html",
                streamed=True,
                transcripts=transcripts,
                summary_url="",
                **await self._summary(
                    visitor, run_id, stored, stored.event_count, {t.element for t in transcripts}
                ),
            )

        return await self._answer(request, page)

    async def summary(self, request: Request) -> Response:
        """A big run's summary (its state, counts, scores, tasks, collection), swapped into its
        page once the first messages are there, with what the page loads next: the events after
        `after` (the last it shows), or the live stream."""
        run_id = request.path_params["run_id"]
        params = request.query_params

        async def page(visitor: Visitor) -> Response:
            try:
                after = int(params.get("after", "0"))
            except ValueError:
                raise Refused(400, "after: not a sequence number") from None
            stored = await self._calls.get_run(visitor.token, run_id, ingest.AGENT_RUN_VIEW_BASIC)
            return self._render(
                request,
                visitor,
                "_run_summary.html",
                **await self._summary(visitor, run_id, stored, after, _shown(params)),
            )

        return await self._answer(request, page)

    async def _summary(
        self,
        visitor: Visitor,
        run_id: str,
        stored: Any,
        shown_through: int,
        shown: set[str],
    ) -> dict[str, Any]:
        """What a run page says beside its messages: the run's collection, scores, metadata and
        tasks, and where it reads on: the events after `shown_through` that it was drawn
        without (a big run), else its live stream while it runs."""
        tasks_call = None
        if "orchestrator" in self._services:
            tasks_call = asyncio.ensure_future(
                self._calls.list_tasks(
                    visitor.token, orch.ListTasksRequest(agent_run_id=run_id, page_size=100)
                )
            )
        try:
            collection = await self._calls.get_collection(visitor.token, id=stored.collection_id)
            tasks = list((await tasks_call).tasks) if tasks_call is not None else None
        finally:
            if tasks_call is not None:
                tasks_call.cancel()
        history_url = live_url = ""
        if shown_through < stored.event_count:
            history_url = self._history_url(run_id, shown_through, stored.event_count, shown)
        elif stored.state != ingest.AGENT_RUN_STATE_FINISHED:
            live_url = _live_url(run_id, shown_through, shown)
        return {
            "stored": stored,
            "run": stored.agent_run,
            "collection": collection,
            "metadata": views.metadata(stored.agent_run.metadata),
            "scores": views.scores(stored.agent_run),
            "tasks": tasks,
            "history_url": history_url,
            "live_url": live_url,
        }

    async def _read_events(
        self, token: str | None, run_id: str, after: int, until: int | None, into: Any
    ) -> int:
        """Fold the run's events after `after` into `into` (an AgentRun) until about
        MESSAGES_PER_PAGE messages have come, or event `until` has (None: until the stream
        pauses, its stored events sent); the last event read."""
        last, added = after, 0
        if until is not None and after >= until:
            return last
        stream = self._calls.watch_run(token, run_id, after)
        try:
            while True:
                try:
                    # A watch sends stored events back to back, then waits for new ones.
                    wait = None if until is not None or last == after else CAUGHT_UP_SECONDS
                    response = await asyncio.wait_for(anext(stream), wait)
                except (StopAsyncIteration, TimeoutError):
                    return last
                for event in response.events:
                    if (until is not None and event.sequence > until) or (
                        added >= MESSAGES_PER_PAGE
                    ):
                        return last
                    added += views.merge(into, event.patch)
                    last = event.sequence
                if until is not None and last >= until:
                    return last
        finally:
            await stream.aclose()

    def _history_url(self, run_id: str, after: int, until: int, shown: Iterable[str]) -> str:
        return f"/history/{quote(run_id, safe='')}?" + urlencode(
            {"after": after, "until": until, "known": ",".join(sorted(shown))}
        )

    async def history(self, request: Request) -> Response:
        """The next of a big run's events after `after` (up to `until`, the last the page was
        drawn with), as fragments htmx appends to the page's transcripts, then the loader of the
        next ones; the last of them opens the live run's event stream."""
        run_id = request.path_params["run_id"]
        params = request.query_params

        async def page(visitor: Visitor) -> Response:
            try:
                after, until = int(params.get("after", "0")), int(params.get("until", "0"))
            except ValueError:
                raise Refused(400, "after, until: not sequence numbers") from None
            shown = _shown(params)
            read = run_pb.AgentRun()
            last = await self._read_events(visitor.token, run_id, after, until, read)
            groups = views.appended(read, shown)  # adds the new transcripts to `shown`
            next_url = self._history_url(run_id, last, until, shown) if last < until else ""
            live_url = ""
            if not next_url:
                stored = await self._calls.get_run(
                    visitor.token, run_id, ingest.AGENT_RUN_VIEW_BASIC
                )
                if stored.state != ingest.AGENT_RUN_STATE_FINISHED:
                    live_url = _live_url(run_id, until, shown)
            return self._render(
                request,
                visitor,
                "_history.html",
                groups=groups,
                run_id=run_id,
                history_url=next_url,
                live_url=live_url,
            )

        return await self._answer(request, page)

    async def messages(self, request: Request) -> Response:
        """The next page of a transcript's messages (`t`: its element id; `start`: the first
        one's index), with the loader of the page after it: what a run page loads as the reader
        scrolls down."""
        run_id = request.path_params["run_id"]
        params = request.query_params

        async def page(visitor: Visitor) -> Response:
            try:
                start = max(0, int(params.get("start", "0")))
                until = int(params["until"]) if "until" in params else None
            except ValueError:
                raise Refused(400, "start, until: not message indexes") from None
            stored = await self._calls.get_run(visitor.token, run_id)
            found = next(
                (
                    t
                    for t in stored.agent_run.transcripts
                    if views.element_id(t.key) == params.get("t")
                ),
                None,
            )
            if found is None:
                raise Refused(404, f"run {run_id!r} has no such transcript")
            return self._render(
                request,
                visitor,
                "_more.html",
                t=views.transcript(found, start, MESSAGES_PER_PAGE, until),
                run_id=run_id,
            )

        return await self._answer(request, page)

    async def live(self, request: Request) -> Response:
        """The run's events after `after` as server-sent events, each a fragment of HTML that
        htmx swaps out of band into the page: new messages at the end of their transcript (a new
        transcript at the end of the run), the state. The stream ends (event `close`) once the
        run is finished and every event is sent; a reconnect resumes after Last-Event-ID."""
        run_id = request.path_params["run_id"]
        try:
            visitor = self._visit(request)
        except _SignIn:
            return Response(status_code=401)
        params = request.query_params
        try:
            after = max(
                int(params.get("after", "0")), int(request.headers.get("last-event-id", "0"))
            )
        except ValueError:
            return Response("after: not a sequence number", status_code=400)
        known = _shown(params)
        template = self._env.get_template("_live.html")

        async def events() -> AsyncIterator[str]:
            nonlocal after
            stream = self._calls.watch_run(visitor.token, run_id, after)
            next_item = None
            stopping = asyncio.ensure_future(self.stopping.wait())
            try:
                while True:
                    if next_item is None:
                        next_item = asyncio.ensure_future(anext(stream))
                    done, _ = await asyncio.wait(
                        {next_item, stopping},
                        timeout=KEEPALIVE_SECONDS,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if stopping in done:  # the server shuts down: the browser reconnects later
                        return
                    if not done:
                        yield ": keepalive\n\n"
                        continue
                    try:
                        response = next_item.result()
                    except StopAsyncIteration:
                        break
                    except CallFailed as exc:
                        yield _sse(
                            "failed",
                            self._env.get_template("_live_failed.html").render(message=exc.message),
                        )
                        break
                    next_item = None
                    landed = run_pb.AgentRun()
                    for event in response.events:
                        views.merge(landed, event.patch)
                    html = template.render(
                        groups=views.appended(landed, known),
                        state=views.RUN_STATES.get(response.state, ""),
                        run_id=run_id,
                    )
                    last = response.events[-1].sequence if response.events else after
                    after = max(after, last)
                    yield _sse("message", html, after)
                yield _sse("close", "")
            finally:
                stopping.cancel()
                if next_item is not None:
                    next_item.cancel()
                with contextlib.suppress(Exception):
                    await stream.aclose()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"x-accel-buffering": "no"}
        )

    # --- workflows and tasks --------------------------------------------------------------------

    async def workflow(self, request: Request) -> Response:
        name = request.path_params["name"]

        async def page(visitor: Visitor) -> Response:
            definition = (await self._calls.get_workflow(visitor.token, name)).workflow
            backlog = list((await self._calls.backlog(visitor.token, name)).stages)
            dead = await self._calls.list_tasks(
                visitor.token,
                orch.ListTasksRequest(
                    workflow=name, state=wf.TASK_STATE_DEAD, page_size=TASKS_PER_PAGE
                ),
            )
            counts = {
                b.stage: {
                    "ready": b.ready_count,
                    "leased": b.leased_count,
                    "dead": b.dead_count,
                }
                for b in backlog
            }
            return self._render(
                request,
                visitor,
                "workflow.html",
                workflow=definition,
                backlog=backlog,
                graph=views.graph(definition, counts),
                ends=list(views.pathway_ends(definition)),
                dead=list(dead.tasks),
                more_dead=bool(dead.next_page_token),
                may_redrive=visitor.may(_REDRIVE),
                may_cancel=visitor.may(_CANCEL),
                done=request.query_params.get("done", ""),
                seconds=views.seconds,
            )

        return await self._answer(request, page)

    async def tasks(self, request: Request) -> Response:
        name = request.path_params["name"]
        params = request.query_params
        stage = params.get("stage", "")
        state = params.get("state", "")

        async def page(visitor: Visitor) -> Response:
            states = {v: k for k, v in views.TASK_STATES.items()}
            if state and state not in states:
                raise Refused(400, f"state {state!r}: choose {', '.join(states)}")
            listed = await self._calls.list_tasks(
                visitor.token,
                orch.ListTasksRequest(
                    workflow=name,
                    stage=stage,
                    state=states.get(state, 0),  # type: ignore[arg-type]
                    page_size=TASKS_PER_PAGE,
                    page_token=params.get("page", ""),
                ),
            )
            query = [(k, v) for k, v in (("stage", stage), ("state", state)) if v]
            token = listed.next_page_token
            return self._render(
                request,
                visitor,
                "tasks.html",
                workflow=name,
                stage=stage,
                state=state,
                tasks=list(listed.tasks),
                next_url=f"{request.url.path}?{urlencode([*query, ('page', token)])}"
                if token
                else "",
            )

        return await self._answer(request, page)

    async def task(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]

        async def page(visitor: Visitor) -> Response:
            task = await self._calls.get_task(visitor.token, task_id)
            return self._render(
                request,
                visitor,
                "task.html",
                task=task,
                may_redrive=visitor.may(_REDRIVE),
                may_cancel=visitor.may(_CANCEL),
            )

        return await self._answer(request, page)

    async def redrive(self, request: Request) -> Response:
        return await self._act(request, "redrive")

    async def cancel(self, request: Request) -> Response:
        return await self._act(request, "cancel")

    async def _act(self, request: Request, action: str) -> Response:
        """Redrive or cancel the tasks a form names (`task_id`, repeated), else every one of its
        `stage` (or of the workflow), as `agentrun tasks redrive/cancel` do: through the same
        RPC, with the visitor's key. Answers with a redirect to the workflow page (htmx:
        HX-Redirect), which says how many moved."""
        name = request.path_params["name"]

        async def page(visitor: Visitor) -> Response:
            form = await _form(request, many=("task_id",))
            self._check_csrf(request, visitor, form)
            ids = [i for i in form.get("task_id", "").split("\n") if i]
            stage = form.get("stage", "")
            if not ids and form.get("scope") != "stage":
                raise Refused(400, "task_id: select at least one task")
            call = self._calls.redrive if action == "redrive" else self._calls.cancel
            count = await call(visitor.token, name, stage, ids)
            verb = "redriven" if action == "redrive" else "cancelled"
            target = f"/workflows/{quote(name, safe='')}?" + urlencode(
                {"done": f"{count} task{'s' if count != 1 else ''} {verb}"}
            )
            if request.headers.get("hx-request"):
                return Response(status_code=204, headers={"HX-Redirect": target})
            return RedirectResponse(target, status_code=303)

        return await self._answer(request, page)


class Refused(Exception):
    """A request the console itself refuses (a bad form, a stale CSRF token): its HTTP status
    and the message shown."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _shown(params: Any) -> set[str]:
    """The element ids of the transcripts a page shows, as its URL's `known` names them."""
    return set(filter(None, params.get("known", "").split(",")))


def _live_url(run_id: str, after: int, shown: Iterable[str]) -> str:
    """Where a run page hears the run's events after `after` (`shown`: the element ids of the
    transcripts on the page)."""
    return f"/live/{quote(run_id, safe='')}?" + urlencode(
        {"after": after, "known": ",".join(sorted(shown))}
    )


def _chunked(pieces: Iterator[str], size: int = 32_768) -> Iterator[bytes]:
    """A template's output pieces joined into chunks of about `size` bytes."""
    buffer: list[str] = []
    held = 0
    for piece in pieces:
        buffer.append(piece)
        held += len(piece)
        if held >= size:
            yield "".join(buffer).encode()
            buffer, held = [], 0
    if buffer:
        yield "".join(buffer).encode()


def _sse(event: str, data: str, id: int | None = None) -> str:
    lines = [f"event: {event}"]
    if id is not None:
        lines.append(f"id: {id}")
    lines += [f"data: {line}" for line in data.splitlines() or [""]]
    return "\n".join(lines) + "\n\n"


def _local(path: str, query: str = "") -> str:
    """`path` if it is a path of this console, else "/" (no open redirect after sign-in)."""
    if not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return f"{path}?{query}" if query else path


async def _form(request: Request, many: tuple[str, ...] = ()) -> dict[str, str]:
    """A URL-encoded form's fields (the last value of each; the fields in `many` joined by
    newlines). At most 1 MB."""
    body = await request.body()
    if len(body) > 1 << 20:
        raise Refused(413, "the form is over 1 MB")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: "\n".join(v) if k in many else v[-1] for k, v in fields.items()}
