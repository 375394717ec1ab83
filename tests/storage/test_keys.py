"""The storage contract: API keys (issue 15)."""

from __future__ import annotations

import pytest

from agentrun_server._errors import AlreadyExists, NotFound
from agentrun_server.storage import ApiKeyRecord

from .conftest import OpenStorage


async def test_keys_are_created_once_listed_revoked_and_seen_by_another_store(
    open_store: OpenStorage,
) -> None:
    one, other = await open_store(), await open_store()
    start = await other.keys_version()
    ingest = ApiKeyRecord("ingest-a", ("ingest",), ("a",), (), "h1", None, 10.0)
    worker = ApiKeyRecord("worker", ("work", "read"), (), ("w",), None, "CN=worker-1", 11.0)
    assert await one.create_key(ingest) == ingest
    assert await one.create_key(worker) == worker
    with pytest.raises(AlreadyExists, match="ingest-a"):
        await one.create_key(ApiKeyRecord("ingest-a", ("read",), token_hash="h2", created_at=1))
    with pytest.raises(AlreadyExists, match="CN=worker-1"):  # one live entry per subject
        await one.create_key(ApiKeyRecord("w2", ("read",), subject="CN=worker-1", created_at=1))
    with pytest.raises(AlreadyExists):  # token hashes are unique
        await one.create_key(ApiKeyRecord("dup", ("read",), token_hash="h1", created_at=1))
    created = await other.keys_version()
    assert created > start
    assert [k.name for k in await other.list_keys()] == ["ingest-a", "worker"]

    revoked = await other.revoke_key("worker", 20.0)
    assert revoked.revoked_at == 20.0
    assert await one.keys_version() > created
    assert (await one.revoke_key("worker", 30.0)).revoked_at == 20.0  # a no-op, kept as it was
    with pytest.raises(NotFound, match="nobody"):
        await one.revoke_key("nobody", 30.0)
    # The subject is free again once its entry is revoked.
    await one.create_key(ApiKeyRecord("worker-2", ("work",), subject="CN=worker-1", created_at=31))


async def test_last_use_only_moves_forward(open_store: OpenStorage) -> None:
    store = await open_store()
    await store.create_key(ApiKeyRecord("k", ("read",), token_hash="h", created_at=1.0))
    version = await store.keys_version()
    await store.touch_keys({"k": 50.0})
    await store.touch_keys({"k": 40.0, "gone": 60.0})
    (key,) = await store.list_keys()
    assert key.last_used_at == 50.0
    assert await store.keys_version() == version  # use is not a change servers reload for
