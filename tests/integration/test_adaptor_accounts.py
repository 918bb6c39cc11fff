"""Adaptor accounts (svc.adaptor.<name>) in the device accounts plugin, on the real Mosquitto.

An adaptor publishes for many devices over one connection (or several: client id = its username, or its
username + "." + a suffix), but only for the devices assigned to it, each device having at most one
adaptor. These tests pin what an adaptor can and cannot publish, receive and log in with, what the admin's
commands do to its connections, that assignments are checked at every publish (unassign, move, a disabled
or deleted device), that they survive a restart and a compaction of the journal, that thousands are
assigned in one call, and the `sc-gateway adaptors` commands.
"""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path

import pytest

from gateway.broker_admin import (
    DEVICE_CONTROL_TOPIC,
    NOT_ASSIGNED,
    Assignment,
    BrokerAdmin,
    BrokerAdminError,
    Credentials,
    device_password_fields,
    new_password,
)
from gateway.cli import main
from stack.services import MosquittoService, start_mosquitto
from tests.support.broker_client import (
    ADMINISTRATIVE_ACTION,
    NOT_AUTHORIZED,
    Client,
    Connect,
)

UPLINK = ("telemetry", "event", "status")


def _name(prefix: str = "ad") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _devices(admin: BrokerAdmin, count: int, device_type: str = "streetlight") -> list[str]:
    """New device accounts; returns their ids (their topics: sc/v1/{device_type}/{id}/...)."""
    prefix = _name("adev")
    ids = [f"{prefix}-{i:05d}" for i in range(count)]
    admin.create_devices((i, device_type) for i in ids)
    return ids


def _uplink(device_id: str, kind: str = "telemetry", device_type: str = "streetlight") -> str:
    return f"sc/v1/{device_type}/{device_id}/{kind}"


def _watcher(mosquitto: MosquittoService, connect: Connect) -> Client:
    """The admin reads every topic (an operator's mosquitto_sub): it sees whatever gets through."""
    watcher = connect(
        Credentials(mosquitto.admin_username, mosquitto.admin_password), f"watch-{uuid.uuid4().hex[:8]}"
    )
    assert not watcher.subscribe("sc/v1/#").is_failure
    return watcher


# ---- what an adaptor may publish -------------------------------------------------------------------------


def test_an_adaptor_publishes_only_for_its_assigned_devices(
    mosquitto: MosquittoService, admin: BrokerAdmin, connect: Connect
) -> None:
    nbiot, lora = admin.create_adaptor(_name()), admin.create_adaptor(_name())
    assert nbiot.username.startswith("svc.adaptor.")
    (light,) = _devices(admin, 1, "streetlight")
    (smoke,) = _devices(admin, 1, "smoke_detector")
    (free,) = _devices(admin, 1, "streetlight")
    (theirs,) = _devices(admin, 1, "streetlight")
    assert admin.assign_devices(nbiot.username, [light, smoke]) == Assignment(changed=2)
    assert admin.assign_devices(lora.username, [theirs]).changed == 1
    watcher = _watcher(mosquitto, connect)
    adaptor = connect(nbiot, nbiot.username)

    # Its devices' uplink, with each device's own type (from the plugin's record of the device).
    for device_id, device_type in ((light, "streetlight"), (smoke, "smoke_detector")):
        for kind in UPLINK:
            topic = _uplink(device_id, kind, device_type)
            assert adaptor.allowed(topic, b'{"ok": 1}'), topic
            message = watcher.receive()
            assert (message.topic, message.payload) == (topic, b'{"ok": 1}')

    for topic in (
        _uplink(free),  # assigned to nobody
        _uplink(theirs),  # assigned to another adaptor
        _uplink(light, device_type="manhole_cover"),  # its device under another type
        _uplink(light, "cmd"),
        _uplink(light) + "/x",
        f"sc/v1/streetlight/{light}",
        "sc/v1/incidents/x",
        f"sc/v1/streetlight/{nbiot.username}/telemetry",
        DEVICE_CONTROL_TOPIC,
    ):
        assert adaptor.publish(topic, b'{"spoofed": true}').value == NOT_AUTHORIZED, topic
    # Delivered in order: had a refused message got through, it would come before this one.
    assert adaptor.allowed(_uplink(light), b'{"last": 1}')
    assert watcher.receive().payload == b'{"last": 1}'

    other = connect(lora, lora.username)
    assert other.allowed(_uplink(theirs))
    assert other.publish(_uplink(light)).value == NOT_AUTHORIZED


def test_an_adaptor_logs_in_with_its_password_and_client_ids_of_its_own(
    admin: BrokerAdmin, connect: Connect
) -> None:
    account = admin.create_adaptor(_name())
    other = admin.create_adaptor(_name())
    username = account.username
    (device,) = _devices(admin, 1)
    admin.assign_devices(username, [device])

    assert connect(Credentials(username, account.password + "x"), username).refused
    assert connect(Credentials(username, ""), username).refused
    assert connect(other, username).refused  # another adaptor's credentials on its client id
    for client_id in (
        "not-the-adaptor",
        username + "x",  # a prefix of the client id, but not followed by "."
        username + ".",  # "." and nothing after it
        other.username,
        other.username + ".1",
        device,
        "svc.gateway.x.0",
    ):
        assert connect(account, client_id).refused, client_id

    # One adaptor, several connections at once, each publishing.
    connections = [connect(account, cid) for cid in (username, f"{username}.1", f"{username}.worker-2.a")]
    assert all(c.accepted for c in connections)
    for c in connections:
        assert c.allowed(_uplink(device))
    assert admin.get_client(username) == {"username": username, "disabled": False, "devices": 1}
    assert admin.get_adaptor(username) == admin.get_client(username)
    assert admin.exists(username)
    assert username in admin.list_adaptors()
    assert username in admin.list_clients()


# ---- the admin's commands --------------------------------------------------------------------------------


def test_disabling_an_adaptor_kicks_every_connection_until_enabled(
    admin: BrokerAdmin, connect: Connect
) -> None:
    account = admin.create_adaptor(_name())
    (device,) = _devices(admin, 1)
    admin.assign_devices(account.username, [device])
    connections = [connect(account, f"{account.username}.{i}") for i in range(3)]
    assert all(c.accepted for c in connections)

    admin.disable(account.username)
    for c in connections:
        assert c.wait_disconnected().value == ADMINISTRATIVE_ACTION
    assert admin.is_disabled(account.username)
    assert connect(account, account.username).refused

    admin.enable(account.username)
    assert not admin.is_disabled(account.username)
    again = connect(account, f"{account.username}.again")
    assert again.accepted
    assert again.allowed(_uplink(device, "status"))


def test_rotating_an_adaptors_password_kicks_every_connection(admin: BrokerAdmin, connect: Connect) -> None:
    account = admin.create_adaptor(_name())
    connections = [connect(account, f"{account.username}.{i}") for i in range(2)]

    password = admin.rotate_password(account.username)
    for c in connections:
        assert c.wait_disconnected().value == ADMINISTRATIVE_ACTION
    assert connect(account, account.username).refused
    assert connect(Credentials(account.username, password), account.username).accepted


def test_unassigning_or_moving_a_device_stops_the_adaptor_at_once(
    admin: BrokerAdmin, connect: Connect
) -> None:
    first, second = admin.create_adaptor(_name()), admin.create_adaptor(_name())
    device, kept = _devices(admin, 2)
    admin.assign_devices(first.username, [device, kept])
    adaptor = connect(first, first.username)
    assert adaptor.allowed(_uplink(device))

    # Checked at every publish: the same connection is refused from now on.
    assert admin.unassign_devices(first.username, [device]) == Assignment(changed=1)
    assert adaptor.publish(_uplink(device)).value == NOT_AUTHORIZED
    assert adaptor.allowed(_uplink(kept))
    assert admin.unassign_devices(first.username, [device, "no-such-device"]).errors == {
        device: NOT_ASSIGNED,
        "no-such-device": "Client not found",
    }

    # A device has one adaptor: assigning it to another moves it, and says from where.
    admin.assign_devices(first.username, [device])
    assert adaptor.allowed(_uplink(device))
    moved = admin.assign_devices(second.username, [device])
    assert moved == Assignment(changed=1, moved={device: first.username})
    assert adaptor.publish(_uplink(device)).value == NOT_AUTHORIZED
    assert connect(second, second.username).allowed(_uplink(device))
    assert admin.get_client(device)["adaptor"] == second.username
    assert admin.get_adaptor(first.username)["devices"] == 1
    assert admin.list_adaptor_devices(first.username) == [kept]
    assert admin.unassign_devices(first.username, [device]).errors == {device: NOT_ASSIGNED}
    # Again to the same adaptor: nothing changes.
    assert admin.assign_devices(second.username, [device]) == Assignment(unchanged=1)


def test_a_disabled_or_deleted_device_cannot_be_published_for(admin: BrokerAdmin, connect: Connect) -> None:
    account = admin.create_adaptor(_name())
    (device,) = _devices(admin, 1)
    admin.assign_devices(account.username, [device])
    adaptor = connect(account, account.username)

    admin.disable(device)
    assert adaptor.publish(_uplink(device)).value == NOT_AUTHORIZED
    admin.enable(device)
    assert adaptor.allowed(_uplink(device))

    admin.delete(device)
    assert adaptor.publish(_uplink(device)).value == NOT_AUTHORIZED
    assert admin.get_adaptor(account.username)["devices"] == 0
    # A device created again under that id starts unassigned.
    admin.create_device(device, "streetlight")
    assert "adaptor" not in admin.get_client(device)
    assert adaptor.publish(_uplink(device)).value == NOT_AUTHORIZED


def test_deleting_an_adaptor_kicks_it_and_frees_its_devices(admin: BrokerAdmin, connect: Connect) -> None:
    account, successor = admin.create_adaptor(_name()), admin.create_adaptor(_name())
    devices = _devices(admin, 3)
    admin.assign_devices(account.username, devices)
    adaptor = connect(account, account.username)

    admin.delete(account.username)
    assert adaptor.wait_disconnected().value == ADMINISTRATIVE_ACTION
    assert not admin.exists(account.username)
    assert connect(account, account.username).refused
    assert all("adaptor" not in admin.get_client(d) for d in devices)
    for action in (admin.rotate_password, admin.disable, admin.enable, admin.delete, admin.get_adaptor):
        with pytest.raises(BrokerAdminError, match="Client not found"):
            action(account.username)
    # Free to be assigned elsewhere, without a "moved".
    assert admin.assign_devices(successor.username, devices) == Assignment(changed=3)


def test_unknown_devices_and_bad_commands_are_errors(admin: BrokerAdmin) -> None:
    account = admin.create_adaptor(_name())
    (known,) = _devices(admin, 1)
    result = admin.assign_devices(account.username, [known, "not-registered"])
    assert (result.changed, result.errors) == (1, {"not-registered": "Client not found"})
    assert not result.ok
    assert admin.list_adaptor_devices(account.username) == [known]

    with pytest.raises(BrokerAdminError, match="Client not found"):
        admin.assign_devices(_name(), [known])
    with pytest.raises(BrokerAdminError, match="Client already exists"):
        admin.create_adaptor(account.username)
    for bad in ("a.b", "", "x" * 53, "has space"):
        with pytest.raises(ValueError):
            admin.create_adaptor(bad)
    with pytest.raises(ValueError):
        admin.assign_devices(account.username, ["has/slash"])
    with pytest.raises(ValueError, match="create_adaptor"):
        admin.create_service_account(f"svc.adaptor.{_name()}", "sc-adaptor")

    good = device_password_fields(new_password())
    responses = admin.execute_devices(
        [
            {"command": "createAdaptor", "username": "svc.adaptor.a.b", **good},
            {"command": "createAdaptor", "username": "svc.other", **good},
            {"command": "createAdaptor", "username": "svc.adaptor.", **good},
            {"command": "createAdaptor", "username": f"svc.adaptor.{_name()}", "salt": "x", "hash": "y"},
            {"command": "assignDevices", "username": account.username},
            {"command": "assignDevices", "username": account.username, "devices": [7, "a.b", known]},
            {"command": "getAdaptor"},
            {"command": "listAdaptorDevices", "username": "svc.adaptor.nobody"},
        ]
    )
    assert [r.get("error") for r in responses] == [
        "Invalid/missing username",
        "Invalid/missing username",
        "Invalid/missing username",
        "Invalid salt or hash",
        "Missing/invalid devices array",
        None,
        "Invalid/missing username",
        "Client not found",
    ]
    assert responses[5]["data"] == {
        "assigned": 0,
        "unchanged": 1,
        "moved": {},
        "errors": {"#1": "Invalid username", "#2": "Invalid username"},
    }


def test_only_the_admin_may_administer_adaptors(
    mosquitto: MosquittoService, admin: BrokerAdmin, connect: Connect
) -> None:
    account = admin.create_adaptor(_name())
    (device,) = _devices(admin, 1)
    forged = json.dumps(
        {
            "commands": [
                {"command": "assignDevices", "username": account.username, "devices": [device]},
                {
                    "command": "createAdaptor",
                    "username": f"svc.adaptor.{_name()}",
                    **device_password_fields("x"),
                },
            ]
        }
    ).encode()
    device_password = admin.rotate_password(device)
    for intruder in (
        connect(account, account.username),
        connect(Credentials(device, device_password), device),
        connect(mosquitto.publisher_account, f"pub-{uuid.uuid4().hex[:8]}"),
    ):
        assert intruder.publish(DEVICE_CONTROL_TOPIC, forged).value == NOT_AUTHORIZED
    assert admin.get_adaptor(account.username)["devices"] == 0


# ---- downlink --------------------------------------------------------------------------------------------


def test_an_adaptor_receives_commands_only_for_its_devices(
    mosquitto: MosquittoService, admin: BrokerAdmin, connect: Connect
) -> None:
    account, other = admin.create_adaptor(_name()), admin.create_adaptor(_name())
    mine, free = _devices(admin, 2)
    admin.assign_devices(account.username, [mine])
    plain = connect(account, account.username)
    shared = connect(account, f"{account.username}.shared")

    for topic in (
        "#",
        "sc/v1/#",
        "sc/v1/+/+/telemetry",
        "sc/v1/+/+/+",
        _uplink(mine),
        _uplink(free, "cmd"),
        f"$share/{other.username}/sc/v1/+/+/cmd",  # a group of another account's name
        "$share/g/sc/v1/+/+/cmd",
        f"{DEVICE_CONTROL_TOPIC}/response",
    ):
        assert plain.subscribe(topic).value == NOT_AUTHORIZED, topic
    assert not plain.subscribe("sc/v1/+/+/cmd").is_failure
    assert not shared.subscribe(f"$share/{account.username}/sc/v1/+/+/cmd").is_failure
    exact = connect(account, f"{account.username}.exact")
    assert not exact.subscribe(_uplink(mine, "cmd")).is_failure

    gateway = connect(mosquitto.gateway_account, f"gw-{uuid.uuid4().hex[:8]}")
    assert gateway.allowed(_uplink(free, "cmd"), b'{"for": "free"}')
    assert gateway.allowed(_uplink(mine, "cmd"), b'{"for": "mine"}')
    for client in (plain, shared, exact):
        message = client.receive()  # the free device's command, sent first, is not delivered
        assert (message.topic, message.payload) == (_uplink(mine, "cmd"), b'{"for": "mine"}')

    # Moved away: the subscription stays, but its commands are no longer delivered to this adaptor.
    admin.assign_devices(other.username, [mine])
    assert gateway.allowed(_uplink(mine, "cmd"), b'{"for": "moved"}')
    admin.assign_devices(account.username, [free])
    assert gateway.allowed(_uplink(free, "cmd"), b'{"for": "free now"}')
    assert plain.receive().payload == b'{"for": "free now"}'


# ---- scale -----------------------------------------------------------------------------------------------


def test_five_thousand_devices_are_assigned_in_one_call(admin: BrokerAdmin, connect: Connect) -> None:
    account = admin.create_adaptor(_name())
    ids = _devices(admin, 5000, "parking_sensor")

    result = admin.assign_devices(account.username, ids)
    assert result == Assignment(changed=5000)
    assert admin.get_adaptor(account.username)["devices"] == 5000
    assert admin.list_adaptor_devices(account.username) == sorted(ids)
    adaptor = connect(account, account.username)
    for device_id in (ids[0], ids[2500], ids[-1]):
        assert adaptor.allowed(_uplink(device_id, device_type="parking_sensor"))

    assert admin.unassign_devices(account.username, ids[:4000]).changed == 4000
    assert admin.list_adaptor_devices(account.username) == sorted(ids[4000:])
    assert adaptor.publish(_uplink(ids[0], device_type="parking_sensor")).value == NOT_AUTHORIZED


# ---- persistence -----------------------------------------------------------------------------------------


def test_adaptors_and_assignments_survive_a_restart(service_dir: Path, connect: Connect) -> None:
    with start_mosquitto(service_dir) as broker:
        with broker.admin() as admin:
            keep, cut, gone = (admin.create_adaptor(n) for n in ("keep", "cut", "gone"))
            d = [f"dev-{i}" for i in range(6)]
            admin.create_devices((i, "manhole_cover") for i in d)
            admin.assign_devices("keep", d[:4])
            admin.assign_devices("cut", [d[4]])
            admin.assign_devices("gone", [d[5]])
            admin.unassign_devices("keep", [d[1]])
            admin.assign_devices("cut", [d[2]])  # moved from keep
            admin.disable(d[3])
            keep = Credentials(keep.username, admin.rotate_password(keep.username))
            admin.disable(cut.username)
            admin.delete(gone.username)
        assert stat.S_IMODE(broker.devices_path.stat().st_mode) == 0o600
        journal = broker.devices_path.read_text()
        assert keep.password not in journal and cut.password not in journal  # salted hashes only

        broker.restart()
        with broker.admin() as admin:
            assert admin.list_adaptors() == ["svc.adaptor.cut", "svc.adaptor.keep"]
            assert admin.list_adaptor_devices("keep") == [d[0], d[3]]
            assert admin.list_adaptor_devices("cut") == [d[2], d[4]]
            assert admin.get_adaptor("cut") == {"username": "svc.adaptor.cut", "disabled": True, "devices": 2}
            assert "adaptor" not in admin.get_client(d[5])
            assert not admin.exists(gone.username)
        assert connect(cut, cut.username, broker).refused
        assert connect(gone, gone.username, broker).refused
        adaptor = connect(keep, f"{keep.username}.1", broker)
        assert adaptor.accepted
        assert adaptor.allowed(_uplink(d[0], device_type="manhole_cover"))
        for refused in (d[1], d[2], d[3], d[5]):  # unassigned, moved, disabled, of a deleted adaptor
            assert adaptor.publish(_uplink(refused, device_type="manhole_cover")).value == NOT_AUTHORIZED


def test_a_compacted_journal_keeps_the_assignments(service_dir: Path, connect: Connect) -> None:
    with start_mosquitto(service_dir) as broker:
        with broker.admin() as admin:
            first, second = admin.create_adaptor("first"), admin.create_adaptor("second")
            ids = [f"churn-{i:03d}" for i in range(400)]
            admin.create_devices((i, "smoke_detector") for i in ids)
            for n in range(8):  # every device moved 8 times: 3,200 assignment lines
                admin.assign_devices("first" if n % 2 == 0 else "second", ids)
        # Compacted on the way (more than 2 lines per adaptor, device and assignment, + 1,024).
        lines = broker.devices_path.read_text().splitlines()
        assert len(lines) < 1 + 2 + 400 + 8 * 400
        assert sum(line.startswith("M ") for line in lines) >= 400

        broker.restart()
        with broker.admin() as admin:
            assert admin.list_adaptor_devices("second") == ids
            assert admin.get_adaptor("first")["devices"] == 0
        assert connect(second, second.username, broker).allowed(_uplink(ids[7], device_type="smoke_detector"))
        refused = connect(first, first.username, broker).publish(
            _uplink(ids[7], device_type="smoke_detector")
        )
        assert refused.value == NOT_AUTHORIZED


# ---- sc-gateway adaptors ---------------------------------------------------------------------------------


def test_the_adaptors_commands(
    mosquitto: MosquittoService,
    admin: BrokerAdmin,
    connect: Connect,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("SC_MQTT_HOST", mosquitto.host)
    monkeypatch.setenv("SC_MQTT_PORT", str(mosquitto.port))
    monkeypatch.setenv("SC_MQTT_ADMIN_USERNAME", mosquitto.admin_username)
    monkeypatch.setenv("SC_MQTT_ADMIN_PASSWORD", mosquitto.admin_password)
    name = _name("cli")
    username = f"svc.adaptor.{name}"
    a, b, c = _devices(admin, 3)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    creds_file = tmp_path / "adaptor.json"
    assert run("adaptors", "create", name, "--credentials-out", str(creds_file))[0] == 0
    assert stat.S_IMODE(creds_file.stat().st_mode) == 0o600
    doc = json.loads(creds_file.read_text())
    account = Credentials(doc["username"], doc["password"])
    assert (account.username, doc["client_id"]) == (username, username)
    code, _, err = run("adaptors", "create", _name(), "--credentials-out", str(creds_file))
    assert code == 1 and "exists" in err
    # The file is opened before the account is made: no password is made that cannot be kept...
    unwritable = _name()
    code, _, err = run("adaptors", "create", unwritable, "--credentials-out", str(tmp_path / "no" / "x.json"))
    assert code == 1 and not admin.exists(f"svc.adaptor.{unwritable}")
    # ...and removed again when the broker refuses.
    code, _, err = run("adaptors", "create", name, "--credentials-out", str(tmp_path / "again.json"))
    assert code == 1 and "Client already exists" in err
    assert not (tmp_path / "again.json").exists()

    devices_csv = tmp_path / "devices.csv"
    devices_csv.write_text(f"device_id,device_type\n{a},streetlight\n{b},streetlight\n")
    code, out, _ = run("adaptors", "assign", name, "--devices-csv", str(devices_csv))
    assert code == 0 and "2 device(s) assigned" in out
    code, out, _ = run("adaptors", "assign", name, "--device", c, "not-registered")
    assert code == 1 and "not-registered: Client not found" in out

    code, out, _ = run("adaptors", "show", name, "--devices", "--json")
    assert code == 0
    assert json.loads(out) == {
        "username": username,
        "disabled": False,
        "devices": 3,
        "device_ids": sorted([a, b, c]),
    }
    code, out, _ = run("adaptors", "list")
    assert code == 0 and username in out

    adaptor = connect(account, f"{username}.1")
    assert adaptor.allowed(_uplink(a))
    assert run("adaptors", "unassign", name, "--device", a)[0] == 0
    assert adaptor.publish(_uplink(a)).value == NOT_AUTHORIZED

    code, out, _ = run("--json", "adaptors", "rotate", name)
    assert code == 0
    account = Credentials(username, json.loads(out)["password"])
    assert adaptor.wait_disconnected().value == ADMINISTRATIVE_ACTION
    adaptor = connect(account, username)
    assert adaptor.allowed(_uplink(b))

    assert run("adaptors", "disable", name)[0] == 0
    assert adaptor.wait_disconnected().value == ADMINISTRATIVE_ACTION
    assert connect(account, username).refused
    assert run("adaptors", "enable", name)[0] == 0
    assert connect(account, username).accepted

    assert run("adaptors", "delete", name)[0] == 0
    code, _, err = run("adaptors", "show", name)
    assert code == 1 and "Client not found" in err
    code, _, err = run("adaptors", "create", "bad.name")
    assert code == 1 and "adaptor name" in err
