"""Fleet file validation, device defaults and inventory URLs: planning, no effects."""

import pytest

from appliance.provision.cli import main
from appliance.provision.errors import ProvisionError
from appliance.provision.fleetconfig import load_fleet
from appliance.provision.inventory import Inventory, sqlite_path


def write(tmp_path, devices, extra=""):
    (tmp_path / "id").write_text("k")
    (tmp_path / "ca").write_text("k")
    text = f'[fleet]\nidentity = "id"\n{extra}\n[ca]\nkey = "ca"\n' + devices
    p = tmp_path / "fleet.toml"
    p.write_text(text)
    return p


def test_defaults_and_relative_paths(tmp_path):
    f = load_fleet(write(tmp_path, '[[device]]\nserial = "AB-12"\naddress = "10.0.0.2"\n'))
    d = f.device[0]
    assert d.hostname == "edge-ab-12" and len(d.device_id) == 16 and d.port == 22 and d.root == "/"
    assert f.fleet.identity == tmp_path / "id" and f.ca.key == tmp_path / "ca"
    assert d.path("/etc/hostname") == "/etc/hostname"
    d2 = d.model_copy(update={"root": "/tmp/dev1"})
    assert d2.path("/etc/hostname") == "/tmp/dev1/etc/hostname"
    f2 = load_fleet(write(tmp_path, '[[device]]\nserial = "X"\naddress = "a"\ndevice_id = "0x10"\n'))
    assert f2.device[0].device_id == "0000000000000010"


@pytest.mark.parametrize("devices,extra,msg", [
    ('[[device]]\nserial = "A"\naddress = "h"\n[[device]]\nserial = "A"\naddress = "i"\n', "",
     ": device[1].serial 'A' repeats device[0]"),
    ('[[device]]\nserial = "a b"\naddress = "h"\n', "", "device.0.serial: must be 1-64"),
    ('[[device]]\nserial = "A"\naddress = "h"\nport = 0\n', "", "device.0.port"),
    ('[[device]]\nserial = "A"\naddress = "h"\nbogus = 1\n', "", "device.0.bogus: Extra inputs"),
    ('[[device]]\nserial = "A"\naddress = "h"\n', "workers = 0", "fleet.workers"),
    ('', "", "device: Field required"),
])
def test_bad_fleet_files_give_one_line_errors(tmp_path, devices, extra, msg, capsys):
    p = write(tmp_path, devices, extra)
    with pytest.raises(ProvisionError) as e:
        load_fleet(p)
    assert msg in str(e.value) and str(e.value).startswith(str(p))
    assert main(["fleet", "apply", str(p)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("provision: error: ") and len(err.strip().splitlines()) == 1


def test_missing_key_file_named(tmp_path):
    p = write(tmp_path, '[[device]]\nserial = "A"\naddress = "h"\n')
    (tmp_path / "ca").unlink()
    with pytest.raises(ProvisionError, match=r"ca\.key: .*/ca not found"):
        load_fleet(p)


def test_inventory_urls(tmp_path):
    assert sqlite_path("sqlite:////tmp/x.db").as_posix() == "/tmp/x.db"
    assert sqlite_path("sqlite:rel.db").as_posix() == "rel.db"
    with pytest.raises(ProvisionError, match="unknown URL"):
        sqlite_path("mysql://u:secret@db/inv")
    with pytest.raises(ProvisionError, match="no inventory here yet"):
        Inventory(f"sqlite:///{tmp_path}/none.sqlite", create=False)
    inv = Inventory(f"sqlite:///{tmp_path}/inv.sqlite")
    assert inv.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    inv.ensure_device("A", "h", 22, "edge-a", "00")
    inv.step_begin("A", "ssh")
    inv.step_end("A", "ssh", "done", "fp")
    assert inv.step_state("A", "ssh") == "done" and inv.get("A")["step"] == "ssh"
    inv.close()


def test_worker_pool_size(tmp_path):
    from appliance.provision.fleet import DEFAULT_WORKERS, default_workers

    many = "".join(f'[[device]]\nserial = "D{i}"\naddress = "h"\nport = {1000 + i}\n' for i in range(40))
    f = load_fleet(write(tmp_path, many))
    assert f.fleet.workers is None and default_workers(f, 40) == DEFAULT_WORKERS == 32
    assert default_workers(f, 3) == 3 and default_workers(f, 40, override=5) == 5
    f = load_fleet(write(tmp_path, many, "workers = 12"))
    assert default_workers(f, 40) == 12 and default_workers(f, 40, override=50) == 50
    with pytest.raises(ProvisionError, match="fleet.runtime_port"):
        load_fleet(write(tmp_path, many, "runtime_port = 70000"))
