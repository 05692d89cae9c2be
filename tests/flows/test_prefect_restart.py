"""A Prefect server restart keeps the concurrency leases of runs in flight.

The deployments' concurrency limits (`prefect.yaml`) are held as leases that every run renews;
Prefect ends a run whose lease it cannot renew. With the default in-memory lease storage a
restarted server knows no lease, so every render in flight would be cancelled at its next
renewal. The farm and the cluster keep leases on disk (PREFECT_HOME/concurrency_leases, a
volume in k8s); this restarts a real server on PostgreSQL-free SQLite and renews a lease."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.farm_harness import PrefectServer

pytestmark = pytest.mark.slow  # a Prefect server restarted

FILESYSTEM = "prefect.server.concurrency.lease_storage.filesystem"
MEMORY = "prefect.server.concurrency.lease_storage.memory"


def _client(server: PrefectServer):
    """A client of ``server``, with its auth string (the harness's server requires one)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    settings = {PREFECT_API_URL: server.api, PREFECT_API_AUTH_STRING: server.auth_string}
    with temporary_settings(settings):
        return get_client(sync_client=True)


# The in-memory storage (Prefect's default) refuses the renewal: MEMORY, False (measured once,
# 2026-12-03; not run every time, to keep the suite short).
@pytest.mark.parametrize(("storage", "kept"), [(FILESYSTEM, True)])
def test_a_restarted_server_renews_the_leases_it_granted_when_they_are_on_disk(
    tmp_path: Path, storage: str, kept: bool
) -> None:
    from httpx import HTTPStatusError
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    server = PrefectServer(
        tmp_path / "prefect",
        f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        lease_storage=storage,
    )
    server.start()
    try:
        with _client(server) as client:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name="gpu", limit=1)
            )
            granted = client.increment_concurrency_slots_with_lease(
                names=["gpu"], slots=1, mode="concurrency", lease_duration=300
            ).json()
        server.stop()
        server.start()
        with _client(server) as client:
            try:
                client.renew_concurrency_lease(lease_id=granted["lease_id"], lease_duration=300)
                renewed = True
            except HTTPStatusError:
                renewed = False
    finally:
        server.stop()
    assert renewed is kept
