"""Limits: the one check of what a call names against the collections and workflows its key is
limited to.

Every RPC that names a collection (by id or name), a run, or a workflow goes through
`Access.check`, with everything it names: a run is judged by its collection, and a collection
by its name and the workflow it is bound to. So a key limited to workflow `grading` cannot
enqueue runs of a collection it cannot read into `grading` (its workers would receive them in
their leases), and a key limited to collection `mine` cannot bind `mine` to a workflow outside its
limits (its uploads would become that workflow's tasks). A key with no limits costs nothing here.
"""

from __future__ import annotations

from collections.abc import Sequence

from agentrun_server._errors import PermissionDenied, ServerError
from agentrun_server.auth._principal import Principal, caller
from agentrun_server.storage import Collection, Storage

CACHE_COLLECTIONS = 10_000
"""Collections kept by id for the checks (a collection's name and binding never change)."""


class Access:
    """Checks a call's targets against its key's limits (`caller()`), reading what it must
    (runs' collections, collections by id) from `storage`."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._collections: dict[str, Collection] = {}

    async def check(
        self,
        field: str,
        *,
        collection_id: str = "",
        collection: Collection | None = None,
        create: tuple[str, str] | None = None,
        run_ids: Sequence[str] = (),
        workflow: str | None = None,
    ) -> None:
        """Raise unless the caller's key may touch every target named.

        Args:
            field: The request field the targets come from, for the message.
            collection_id: A collection by id (NotFound when there is none).
            collection: A collection already read.
            create: (name, workflow) of a collection being created or bound: the key must see
                the collection, and the workflow too when one is named.
            run_ids: Runs, each judged by its collection (runs that do not exist are left to the
                call, which answers NotFound).
            workflow: A workflow ("" means every workflow: only a key without limits may).

        Raises:
            PermissionDenied: a target is outside the key's limits; the message names the field.
            NotFound: `collection_id` names no collection.
        """
        principal = caller()
        if not principal.limited:
            return
        if workflow is not None:
            principal.check_workflow(workflow, field)
        if create is not None:
            name, binding = create
            principal.check_collection(name, binding, field)
            if binding:
                principal.check_workflow(binding, f"{field}: its workflow")
        if collection is not None:
            principal.check_collection(collection.name, collection.workflow, field)
        if collection_id:
            found = await self._collection(collection_id)
            principal.check_collection(found.name, found.workflow, field)
        if run_ids:
            await self._check_runs(principal, field, run_ids)

    async def sees_collection(self, collection_id: str) -> bool:
        """Whether the caller's key may see the collection (False when there is none): what an
        answer may say of a collection the call did not name (a conflict's other collection)."""
        principal = caller()
        if not principal.limited:
            return True
        try:
            found = await self._collection(collection_id)
        except ServerError:  # not found, storage down: say nothing of it
            return False
        return principal.sees_collection(found.name, found.workflow)

    async def _check_runs(self, principal: Principal, field: str, run_ids: Sequence[str]) -> None:
        owners = await self._storage.run_collections(run_ids)
        for collection_id in dict.fromkeys(owners.values()):
            found = await self._collection(collection_id)
            if not principal.sees_collection(found.name, found.workflow):
                run_id = next(r for r, c in owners.items() if c == collection_id)
                index = list(run_ids).index(run_id)
                raise PermissionDenied(
                    f"{field}[{index}]: run {run_id[:256]!r} is in collection {found.name!r}, "
                    f"outside {principal.limits_text()}"
                )

    async def _collection(self, collection_id: str) -> Collection:
        found = self._collections.get(collection_id)
        if found is None:
            found = await self._storage.get_collection(id=collection_id)
            if len(self._collections) >= CACHE_COLLECTIONS:
                self._collections.clear()
            self._collections[collection_id] = found
        return found
