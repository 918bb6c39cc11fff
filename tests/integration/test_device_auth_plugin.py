"""The device accounts plugin (mosquitto/plugin/sc_device_auth.c) on the real Mosquitto.

Devices' accounts live in the plugin (a hash table and an append-only journal), service accounts in the
dynamic security plugin; BrokerAdmin routes between them. These tests pin what a device can and cannot
do, what the admin's commands do to connected clients, what survives a restart (and a torn journal),
and how the two plugins share the work (which one the broker asks first, and who may administer).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.broker_admin import (
    ADMIN_ROLE,
    DEVICE_CONTROL_TOPIC,
    BrokerAdmin,
    BrokerAdminError,
    Credentials,
    device_password_fields,
    device_role,
    new_password,
)
from stack.services import MOSQUITTO_CONF_TEMPLATE, MosquittoService, StackError, start_mosquitto
from tests.support.broker_client import (
    ADMINISTRATIVE_ACTION,
    NOT_AUTHORIZED,
    TIMEOUT_S,
    Client,
    Connect,
    nothing_more,
)


def _device(admin: BrokerAdmin, device_type: str = "streetlight") -> tuple[Credentials, str]:
    device_id = f"dap-{uuid.uuid4().hex[:10]}"
    account = Credentials(device_id, admin.create_device(device_id, device_type))
    return account, f"sc/v1/{device_type}/{device_id}"


def _gateway(mosquitto: MosquittoService, connect: Connect) -> Client:
    return connect(mosquitto.gateway_account, f"gw-{uuid.uuid4().hex[:8]}")


def wait_for(check: Callable[[], bool], *, what: str, timeout: float = TIMEOUT_S) -> None:
    """Poll `check()` until it is true; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _legacy_device(admin: BrokerAdmin, device_id: str, device_type: str) -> str:
    """A device account made the way it was before the plugin: a dynsec role and client of its own."""
    base = f"sc/v1/{device_type}/{device_id}"
    acls = [
        *(
            {"acltype": "publishClientSend", "topic": f"{base}/{k}", "priority": 0, "allow": True}
            for k in ("telemetry", "event", "status")
        ),
        {"acltype": "subscribeLiteral", "topic": f"{base}/cmd", "priority": 0, "allow": True},
        {"acltype": "publishClientReceive", "topic": f"{base}/cmd", "priority": 0, "allow": True},
    ]
    password = new_password()
    admin.command("createRole", rolename=device_role(device_id), acls=acls)
    admin.command(
        "createClient",
        username=device_id,
        password=password,
        clientid=device_id,
        roles=[{"rolename": device_role(device_id)}],
    )
    return password


# ---- logging in -----------------------------------------------------------------------------------------


def test_a_device_logs_in_only_with_its_password_and_its_own_client_id(
    admin: BrokerAdmin, connect: Connect
) -> None:
    account, _ = _device(admin)
    other, _ = _device(admin)
    assert connect(Credentials(account.username, account.password + "x"), account.username).refused
    assert connect(Credentials(account.username, ""), account.username).refused
    assert connect(account, "not-the-device-id").refused
    assert connect(account, other.username).refused  # not even another device's id
    assert connect(other, account.username).refused  # nor another device's credentials on this id
    assert connect(None, account.username).refused  # anonymous
    assert connect(account, account.username).accepted
    assert admin.get_client(account.username) == {
        "username": account.username,
        "clientid": account.username,
        "type": "streetlight",
        "disabled": False,
    }


# ---- what a device may do -------------------------------------------------------------------------------


def test_a_device_cannot_publish_for_another_device(
    mosquitto: MosquittoService, admin: BrokerAdmin, connect: Connect
) -> None:
    account, base = _device(admin)
    _, other_base = _device(admin)
    # The admin reads every topic (an operator's mosquitto_sub): it sees whatever gets through.
    watcher = connect(
        Credentials(mosquitto.admin_username, mosquitto.admin_password), f"w-{uuid.uuid4().hex[:8]}"
    )
    assert not watcher.subscribe("sc/v1/#").is_failure
    device = connect(account, account.username)

    for topic in (
        f"{other_base}/telemetry",
        f"{other_base}/status",
        f"sc/v1/manhole_cover/{account.username}/telemetry",  # its own id under another type
        f"{base}/cmd",
        f"{base}/telemetry/x",
        f"{base}/",
        f"{base}",
        "sc/v1/incidents/x",
        DEVICE_CONTROL_TOPIC,
    ):
        assert device.publish(topic, b'{"spoofed": true}').value == NOT_AUTHORIZED, topic
    for kind in ("telemetry", "event", "status"):
        assert device.publish(f"{base}/{kind}", f'{{"k": "{kind}"}}'.encode()).value != NOT_AUTHORIZED
        message = watcher.receive()
        assert (message.topic, message.payload) == (f"{base}/{kind}", f'{{"k": "{kind}"}}'.encode())
    nothing_more(watcher)  # none of the refused messages was delivered


def test_a_device_subscribes_to_and_receives_only_its_own_commands(
    mosquitto: MosquittoService, admin: BrokerAdmin, connect: Connect
) -> None:
    account, base = _device(admin)
    _, other_base = _device(admin)
    device = connect(account, account.username)
    for topic in (
        f"{other_base}/cmd",
        "sc/v1/streetlight/+/cmd",
        f"{base}/+",
        f"{base}/#",
        f"{base}/telemetry",
        f"$share/g/{base}/cmd",
        "#",
        f"{DEVICE_CONTROL_TOPIC}/response",
    ):
        assert device.subscribe(topic).value == NOT_AUTHORIZED, topic
    assert not device.subscribe(f"{base}/cmd").is_failure

    gateway = _gateway(mosquitto, connect)
    assert gateway.publish(f"{other_base}/cmd", b'{"for": "other"}').value != NOT_AUTHORIZED
    assert gateway.publish(f"{base}/cmd", b'{"for": "me"}').value != NOT_AUTHORIZED
    message = device.receive()
    assert (message.topic, message.payload) == (f"{base}/cmd", b'{"for": "me"}')
    nothing_more(device)


# ---- the admin's commands -------------------------------------------------------------------------------


def test_rotation_kicks_the_device_and_the_old_password_stops(admin: BrokerAdmin, connect: Connect) -> None:
    account, base = _device(admin)
    device = connect(account, account.username)
    assert device.accepted

    password = admin.rotate_password(account.username)
    assert password != account.password
    assert device.wait_disconnected().value == ADMINISTRATIVE_ACTION
    assert connect(account, account.username).refused
    again = connect(Credentials(account.username, password), account.username)
    assert again.accepted
    assert again.publish(f"{base}/telemetry").value != NOT_AUTHORIZED


def test_disable_kicks_the_device_and_refuses_it_until_enabled(admin: BrokerAdmin, connect: Connect) -> None:
    account, base = _device(admin)
    device = connect(account, account.username)

    admin.disable(account.username)
    assert device.wait_disconnected().value == ADMINISTRATIVE_ACTION
    assert admin.is_disabled(account.username)
    assert connect(account, account.username).refused

    admin.enable(account.username)
    assert not admin.is_disabled(account.username)
    again = connect(account, account.username)
    assert again.accepted
    assert again.publish(f"{base}/event").value != NOT_AUTHORIZED


def test_delete_kicks_the_device_and_forgets_it(admin: BrokerAdmin, connect: Connect) -> None:
    account, _ = _device(admin)
    device = connect(account, account.username)

    admin.delete(account.username)
    assert device.wait_disconnected().value == ADMINISTRATIVE_ACTION
    assert not admin.exists(account.username)
    assert connect(account, account.username).refused
    for action in (admin.rotate_password, admin.disable, admin.enable, admin.delete, admin.get_client):
        with pytest.raises(BrokerAdminError, match="Client not found"):
            action(account.username)
    # The id is free again.
    password = admin.create_device(account.username, "streetlight")
    assert connect(Credentials(account.username, password), account.username).accepted


def test_a_thousand_devices_are_one_command_each_with_its_own_password(
    admin: BrokerAdmin, connect: Connect
) -> None:
    prefix = f"bulk-{uuid.uuid4().hex[:6]}"
    wanted = [(f"{prefix}-{i:04d}", ("smoke_detector", "parking_sensor")[i % 2]) for i in range(2500)]
    passwords = admin.create_devices(wanted)
    assert sorted(passwords) == [d for d, _ in wanted]
    assert len(set(passwords.values())) == len(wanted)
    assert set(passwords) <= set(admin.list_devices())
    for device_id, device_type in (wanted[0], wanted[1499], wanted[-1]):
        device = connect(Credentials(device_id, passwords[device_id]), device_id)
        assert device.publish(f"sc/v1/{device_type}/{device_id}/telemetry").value != NOT_AUTHORIZED
    with pytest.raises(BrokerAdminError, match="Client already exists"):
        admin.create_devices([(f"{prefix}-new", "streetlight"), wanted[7]])
    assert not admin.exists(f"{prefix}-new")  # nothing created when one exists


def test_malformed_commands_get_errors_and_change_nothing(admin: BrokerAdmin) -> None:
    good = device_password_fields(new_password())
    name = f"bad-{uuid.uuid4().hex[:8]}"
    responses = admin.execute_devices(
        [
            {"command": "noSuchCommand"},
            {"command": "getDevice"},
            {"command": "setDevicePassword", "username": name, **good},
            {"command": "createDevices"},
            {
                "command": "createDevices",
                "devices": [
                    {"username": "has/slash", "type": "streetlight", **good},
                    {"username": "x" * 65, "type": "streetlight", **good},
                    {"username": f"{name}-1", "type": "toaster", **good},
                    {
                        "username": f"{name}-2",
                        "type": "streetlight",
                        "salt": "not base64!",
                        "hash": good["hash"],
                    },
                    {
                        "username": f"{name}-3",
                        "type": "streetlight",
                        "salt": good["salt"],
                        "hash": good["salt"],
                    },
                    {"username": f"{name}-4", "type": "streetlight"},
                ],
            },
        ]
    )
    assert [r.get("error") for r in responses[:4]] == [
        "Unknown command",
        "Invalid/missing username",
        "Client not found",
        "Missing/invalid devices array",
    ]
    create = responses[4]
    assert "error" not in create and create["data"]["created"] == 0
    assert create["data"]["errors"] == {
        "#1": "Invalid username",
        "#2": "Invalid username",
        f"{name}-1": "Invalid type",
        f"{name}-2": "Invalid salt",
        f"{name}-3": "Invalid hash",
        f"{name}-4": "Invalid salt",
    }
    assert not any(admin.exists(f"{name}-{i}") for i in range(1, 5))


def test_only_the_admin_may_use_the_device_control_topic(
    mosquitto: MosquittoService, admin: BrokerAdmin, connect: Connect
) -> None:
    account, _ = _device(admin)
    name = f"forged-{uuid.uuid4().hex[:8]}"
    new_device = {"username": name, "type": "streetlight", **device_password_fields("known")}
    forged = json.dumps(
        {
            "commands": [
                {"command": "createDevices", "devices": [new_device]},
                {"command": "deleteDevice", "username": account.username},
            ]
        }
    ).encode()
    for intruder in (
        _gateway(mosquitto, connect),
        connect(mosquitto.publisher_account, f"adaptor-{uuid.uuid4().hex[:8]}"),
        connect(account, account.username),
    ):
        assert intruder.publish(DEVICE_CONTROL_TOPIC, forged).value == NOT_AUTHORIZED
    assert not admin.exists(name)
    assert admin.exists(account.username)


# ---- the two plugins ------------------------------------------------------------------------------------


def test_service_accounts_stay_in_dynamic_security(
    mosquitto: MosquittoService, admin: BrokerAdmin, connect: Connect
) -> None:
    _, base = _device(admin)
    gateway = _gateway(mosquitto, connect)
    assert not gateway.subscribe("sc/v1/+/+/telemetry").is_failure
    assert gateway.publish(f"{base}/cmd").value != NOT_AUTHORIZED
    assert gateway.publish(f"{base}/telemetry").value == NOT_AUTHORIZED
    assert "roles" in admin.get_client(mosquitto.gateway_account.username)
    assert mosquitto.gateway_account.username not in admin.list_devices()


def test_a_legacy_dynsec_device_keeps_working_and_can_be_managed(
    mosquitto: MosquittoService, admin: BrokerAdmin, connect: Connect
) -> None:
    device_id = f"legacy-{uuid.uuid4().hex[:8]}"
    base = f"sc/v1/access_control/{device_id}"
    account = Credentials(device_id, _legacy_device(admin, device_id, "access_control"))
    device = connect(account, device_id)
    assert device.accepted
    assert device.publish(f"{base}/telemetry").value != NOT_AUTHORIZED
    assert admin.exists(device_id)
    assert admin.get_client(device_id)["roles"] == [{"rolename": device_role(device_id)}]
    with pytest.raises(BrokerAdminError, match="Client already exists"):
        admin.create_device(device_id, "access_control")
    with pytest.raises(BrokerAdminError, match="Client already exists"):
        admin.create_devices([(device_id, "access_control")])

    password = admin.rotate_password(device_id)
    assert device.wait_disconnected().value == ADMINISTRATIVE_ACTION
    assert connect(account, device_id).refused
    account = Credentials(device_id, password)
    again = connect(account, device_id)
    admin.disable(device_id)
    assert again.wait_disconnected().value == ADMINISTRATIVE_ACTION
    assert admin.is_disabled(device_id)
    admin.enable(device_id)
    assert connect(account, device_id).accepted

    admin.delete(device_id)
    assert not admin.exists(device_id)
    with pytest.raises(BrokerAdminError, match="Role not found"):
        admin.command("getRole", rolename=device_role(device_id))
    # Its id can now be issued by the device accounts plugin.
    password = admin.create_device(device_id, "access_control")
    assert connect(Credentials(device_id, password), device_id).accepted
    assert "roles" not in admin.get_client(device_id)


def _swapped_template(tmp_path: Path) -> Path:
    """mosquitto.conf with the dynamic security plugin's lines before the device accounts plugin's."""
    text = MOSQUITTO_CONF_TEMPLATE.read_text()
    ours = (
        "plugin {device_auth_plugin}\nplugin_opt_devices_file {data_dir}/device-accounts.journal\n"
        "plugin_opt_device_types {device_types}\n"
    )
    dynsec = "plugin {dynsec_plugin}\nplugin_opt_config_file {data_dir}/dynamic-security.json\n"
    assert ours + dynsec in text
    path = tmp_path / "swapped.conf"
    path.write_text(text.replace(ours + dynsec, dynsec + ours))
    return path


@pytest.mark.parametrize("order", ["shipped", "swapped"])
def test_the_first_plugin_line_decides_and_dynsec_defers_when_it_has_no_answer(
    order: str, service_dir: Path, tmp_path: Path, connect: Connect
) -> None:
    """Mosquitto asks the plugins in the order of the `plugin` lines; the first answer that is not
    "defer" decides, for logging in and for access checks. A username held by both plugins (only
    possible by sending raw commands) shows who is asked first.

    The dynamic security plugin defers not only for usernames it does not hold but also for an access
    check that none of the client's roles matches (its default access being "deny"); only an explicit
    ACL of a role is an answer. With the shipped order that never reaches the device accounts plugin
    for a service account (it defers for those), and then the broker refuses."""
    template = MOSQUITTO_CONF_TEMPLATE if order == "shipped" else _swapped_template(tmp_path)
    with start_mosquitto(service_dir, conf_template=template) as broker, broker.admin() as admin:
        denied = "sc/v1/streetlight/both/telemetry"
        admin.command(
            "createRole",
            rolename="deny-both",
            acls=[{"acltype": "publishClientSend", "topic": denied, "priority": 0, "allow": False}],
        )
        dynsec_password, plugin_password = new_password(), new_password()
        admin.command(
            "createClient",
            username="both",
            password=dynsec_password,
            clientid="both",
            roles=[{"rolename": "deny-both"}],
        )
        admin.device_command(
            "createDevices",
            devices=[{"username": "both", "type": "streetlight", **device_password_fields(plugin_password)}],
        )
        only_plugin = admin.create_device("only-plugin", "streetlight")

        by_plugin = connect(Credentials("both", plugin_password), "both", broker)
        by_dynsec = connect(Credentials("both", dynsec_password), "both", broker)
        if order == "shipped":
            assert by_plugin.accepted and by_dynsec.refused
            assert by_plugin.publish(denied).value != NOT_AUTHORIZED  # the plugin decided
        else:
            assert by_dynsec.accepted and by_plugin.refused
            assert by_dynsec.publish(denied).value == NOT_AUTHORIZED  # dynsec's explicit deny decided
            # No role of "both" says anything about its status topic: dynsec defers, the plugin allows.
            assert by_dynsec.publish("sc/v1/streetlight/both/status").value != NOT_AUTHORIZED

        # Either way the dynamic security plugin defers for a device it does not hold, for logging in
        # and for access checks.
        device = connect(Credentials("only-plugin", only_plugin), "only-plugin", broker)
        assert device.accepted
        assert device.publish("sc/v1/streetlight/only-plugin/telemetry").value != NOT_AUTHORIZED
        assert device.publish("sc/v1/streetlight/both/telemetry").value == NOT_AUTHORIZED
        assert connect(Credentials("nobody", "x"), "nobody", broker).refused  # all defer: refused


# ---- persistence ----------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_device_accounts_survive_a_restart(service_dir: Path, connect: Connect) -> None:
    with start_mosquitto(service_dir) as broker:
        with broker.admin() as admin:
            passwords = admin.create_devices([(f"keep-{i}", "manhole_cover") for i in range(5)])
            passwords["keep-1"] = admin.rotate_password("keep-1")
            admin.disable("keep-2")
            admin.delete("keep-3")
        assert _mode(broker.devices_path) == 0o600
        journal = broker.devices_path.read_text()
        assert all(p not in journal for p in passwords.values())  # only salted hashes are kept

        broker.restart()
        for device_id in ("keep-0", "keep-1", "keep-4"):
            assert connect(Credentials(device_id, passwords[device_id]), device_id, broker).accepted
        assert connect(Credentials("keep-2", passwords["keep-2"]), "keep-2", broker).refused
        assert connect(Credentials("keep-3", passwords["keep-3"]), "keep-3", broker).refused
        with broker.admin() as admin:
            assert admin.is_disabled("keep-2")
            assert not admin.exists("keep-3")
            assert admin.list_devices() == ["keep-0", "keep-1", "keep-2", "keep-4"]


def test_the_journal_is_compacted_and_still_replays(service_dir: Path, connect: Connect) -> None:
    with start_mosquitto(service_dir) as broker:
        with broker.admin() as admin:
            passwords = admin.create_devices([(f"churn-{i:04d}", "smoke_detector") for i in range(700)])
            deletes = [{"command": "deleteDevice", "username": f"churn-{i:04d}"} for i in range(1, 700)]
            for start in range(0, len(deletes), 200):
                assert not any("error" in r for r in admin.execute_devices(deletes[start : start + 200]))
        # More than 2 lines per remaining device (+1024) after the third message: compacted then.
        assert len(broker.devices_path.read_text().splitlines()) < 1 + 700 + 699
        broker.restart()
        assert connect(Credentials("churn-0000", passwords["churn-0000"]), "churn-0000", broker).accepted
        with broker.admin() as admin:
            assert admin.list_devices() == ["churn-0000"]


def test_a_torn_last_journal_line_is_skipped(service_dir: Path, connect: Connect) -> None:
    with start_mosquitto(service_dir) as broker:
        with broker.admin() as admin:
            password = admin.create_device("whole", "parking_sensor")
        broker.stop()
        with broker.devices_path.open("a") as journal:
            journal.write("C torn parking_sensor AAAA")  # the broker died in the middle of a write

        broker.start()
        assert "line 3 is incomplete" in broker.log_path.read_text()
        assert connect(Credentials("whole", password), "whole", broker).accepted
        with broker.admin() as admin:
            assert not admin.exists("torn")
            later = admin.create_device("later", "parking_sensor")
        # The torn piece was cut off: what comes after it is a line of its own, replayed next time.
        broker.restart()
        assert connect(Credentials("later", later), "later", broker).accepted
        assert connect(Credentials("whole", password), "whole", broker).accepted


def test_a_malformed_line_inside_the_journal_stops_the_broker(service_dir: Path) -> None:
    with start_mosquitto(service_dir) as broker:
        with broker.admin() as admin:
            admin.create_devices([("first", "streetlight"), ("second", "streetlight")])
            admin.disable("first")
        broker.stop()
        lines = broker.devices_path.read_text().splitlines(keepends=True)
        lines[1] = "C first streetlight garbage\n"
        broker.devices_path.write_text("".join(lines))
        # Skipping it could silently undo a disable or a delete: refuse to start, and say where.
        with pytest.raises(StackError, match="line 2 is malformed"):
            broker.start()


def test_a_config_reload_keeps_the_device_accounts(service_dir: Path, connect: Connect) -> None:
    with start_mosquitto(service_dir) as broker:
        with broker.admin() as admin:
            before = admin.create_device("before-hup", "streetlight")
        os.kill(broker.pid, signal.SIGHUP)
        wait_for(lambda: "Reloading config" in broker.log_path.read_text(), what="the broker to reload")
        assert connect(Credentials("before-hup", before), "before-hup", broker).accepted
        with broker.admin() as admin:
            after = admin.create_device("after-hup", "streetlight")
            assert admin.list_devices() == ["after-hup", "before-hup"]
        assert connect(Credentials("after-hup", after), "after-hup", broker).accepted
        assert connect(Credentials("after-hup", before), "after-hup", broker).refused


def test_an_admin_role_from_before_the_plugin_gets_its_rights(service_dir: Path, connect: Connect) -> None:
    with start_mosquitto(service_dir) as broker:
        broker.stop()
        doc = json.loads(broker.dynsec_path.read_text())
        (role,) = [r for r in doc["roles"] if r["rolename"] == ADMIN_ROLE]
        role["acls"] = [a for a in role["acls"] if "sc-device-auth" not in a["topic"]]
        broker.dynsec_path.write_text(json.dumps(doc))

    # A new start on the data dir grants the admin role what it lacks...
    with start_mosquitto(service_dir) as broker, broker.admin() as admin:
        password = admin.create_device("after-upgrade", "streetlight")
        assert connect(Credentials("after-upgrade", password), "after-upgrade", broker).accepted

        # ...and so does ensure_roles() on a running broker; without the right, commands are refused
        # at once (not after a timeout).
        acls = admin.command("getRole", rolename=ADMIN_ROLE)["role"]["acls"]
        kept = [a for a in acls if "sc-device-auth" not in a["topic"]]
        admin.command("modifyRole", rolename=ADMIN_ROLE, acls=kept)  # removeRoleACL would kick us
        with pytest.raises(BrokerAdminError, match="refused the message"):
            admin.exists("after-upgrade")
        admin.ensure_roles()
        assert admin.exists("after-upgrade")
