"""The inventory on a real PostgreSQL server shared by stations (`--inventory postgresql://`);
the two-station fleet run is in test_fleet_lab.py."""

import time

import pytest

from appliance.provision.errors import ProvisionError
from appliance.provision.inventory import Inventory


def test_inventory_operations_on_postgres(postgres):
    with pytest.raises(ProvisionError, match="no inventory here yet"):
        Inventory(postgres, create=False)
    inv = Inventory(postgres)
    inv.ensure_device("A1", "10.0.0.1", 22, "edge-a1", "00000000000000a1")
    inv.start_run("A1")
    inv.step_begin("A1", "ssh")
    inv.step_begin("A1", "ssh")  # a retry counts
    inv.step_end("A1", "ssh", "done", "fp")
    inv.update("A1", host_key_fp="SHA256:x", enrolled_at=1.5e9 + 0.25)
    inv.event("A1", "device-key", {"fp": "f"})
    rec = inv.get("A1")
    assert rec["host_key_fp"] == "SHA256:x" and rec["runs"] == 1 and rec["enrolled_at"] == 1.5e9 + 0.25
    assert inv.steps("A1")["ssh"]["attempts"] == 2 and inv.step_state("A1", "ssh") == "done"
    assert [e["kind"] for e in inv.events("A1")] == ["device-key"]
    # a device is claimed by one station (connection) at a time
    other = Inventory(postgres)
    assert inv.claim("A1") and not other.claim("A1") and other.claim("B2")
    inv.release("A1")
    assert other.claim("A1")
    other.close()  # a station that goes away loses its claims (once its backend has exited)
    deadline = time.monotonic() + 10
    while not inv.claim("A1") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert inv.claim("A1") and inv.claim("B2")
    inv.close()
    bad = postgres.replace("postgres@", "postgres:secret@").rsplit("/", 1)[0] + "/nosuchdb"
    with pytest.raises(ProvisionError, match=r"postgres:\*\*\*@.*inventory unusable: .*nosuchdb") as e:
        Inventory(bad)
    assert "secret" not in str(e.value)
