"""Broker credentials, checked on the real Mosquitto: devices' accounts in the project's device accounts
plugin, service accounts in the dynamic security plugin, both through BrokerAdmin (the plugin's own
behaviour is pinned in test_device_auth_plugin.py).

Each device has its own account (username = client id = device id) and may publish only to its own
uplink topics and subscribe only to its own cmd; the gateway and adaptors have accounts of their own;
anonymous clients are refused. Disabling a device or rotating its password cuts it off at once.
"""

from __future__ import annotations

import json
import queue
import stat
import uuid
from pathlib import Path

import pytest

from gateway.broker_admin import (
    ADAPTOR_ROLE,
    GATEWAY_ROLE,
    BrokerAdmin,
    BrokerAdminError,
    Credentials,
    device_role,
)
from stack.services import MosquittoService, start_mosquitto
from tests.support.broker_client import (
    ADMINISTRATIVE_ACTION,
    NOT_AUTHORIZED,
    Connect,
    nothing_more,
)


def _device(admin: BrokerAdmin, device_type: str = "manhole_cover") -> tuple[Credentials, str]:
    """A new device account; returns its credentials and its topic base sc/v1/{type}/{id}."""
    device_id = f"cred-{uuid.uuid4().hex[:10]}"
    password = admin.create_device(device_id, device_type)
    return Credentials(device_id, password), f"sc/v1/{device_type}/{device_id}"


def test_anonymous_and_wrong_passwords_are_refused(
    mosquitto: MosquittoService, admin: BrokerAdmin, connect: Connect
) -> None:
    anonymous = connect(None, f"anon-{uuid.uuid4().hex[:8]}")
    assert anonymous.connack is not None and anonymous.connack.value == NOT_AUTHORIZED

    account, _ = _device(admin)
    wrong = connect(Credentials(account.username, account.password + "x"), account.username)
    assert wrong.connack is not None and wrong.connack.value == NOT_AUTHORIZED

    gateway = mosquitto.gateway_account
    assert not connect(Credentials(gateway.username, "guess"), "gw-guess").accepted
    assert connect(account, account.username).accepted


def test_a_device_publishes_its_own_uplink_and_gets_its_own_commands(
    mosquitto: MosquittoService, admin: BrokerAdmin, connect: Connect
) -> None:
    account, base = _device(admin)
    # The gateway consumes through a shared subscription: the plugin checks the whole $share/... filter.
    gateway = connect(mosquitto.gateway_account, f"gw-{uuid.uuid4().hex[:8]}")
    group = f"g{uuid.uuid4().hex[:8]}"
    for kind in ("telemetry", "event", "status"):
        assert not gateway.subscribe(f"$share/{group}/sc/v1/+/+/{kind}").is_failure
    device = connect(account, account.username)
    assert device.accepted

    for kind in ("telemetry", "event", "status"):
        assert device.publish(f"{base}/{kind}", f'{{"kind": "{kind}"}}'.encode()).value == 0
        message = gateway.receive()
        assert (message.topic, message.payload) == (f"{base}/{kind}", f'{{"kind": "{kind}"}}'.encode())

    assert not device.subscribe(f"{base}/cmd").is_failure
    assert gateway.publish(f"{base}/cmd", b'{"cmd": "reboot"}').value == 0
    message = device.receive()
    assert (message.topic, message.payload) == (f"{base}/cmd", b'{"cmd": "reboot"}')


def test_a_device_cannot_publish_into_another_devices_topics(
    mosquitto: MosquittoService, admin: BrokerAdmin, connect: Connect
) -> None:
    account, base = _device(admin, "manhole_cover")
    other, other_base = _device(admin, "manhole_cover")
    gateway = connect(mosquitto.gateway_account, f"gw-{uuid.uuid4().hex[:8]}")
    assert not gateway.subscribe("sc/v1/+/+/telemetry").is_failure
    assert not gateway.subscribe("sc/v1/+/+/event").is_failure
    device = connect(account, account.username)

    forbidden = [
        f"{other_base}/telemetry",  # another device's topic
        f"{other_base}/event",
        f"sc/v1/streetlight/{account.username}/telemetry",  # its own id under another type
        f"{base}/cmd",  # its own downlink is the gateway's to send
        f"{base}/telemetry/extra",
        "sc/v1/incidents/fake",
        "$CONTROL/dynamic-security/v1",
    ]
    for topic in forbidden:
        reason = device.publish(topic, b'{"spoofed": true}')
        assert reason.value == NOT_AUTHORIZED, f"{topic}: {reason}"
    # A message after them, from the same client on its own topic: delivered in order, so if none of the
    # forbidden ones arrived before it, none was delivered.
    assert device.publish(f"{base}/telemetry", b'{"marker": true}').value == 0
    message = gateway.receive()
    assert (message.topic, message.payload) == (f"{base}/telemetry", b'{"marker": true}')
    nothing_more(gateway)
    assert connect(other, other.username).accepted  # the other device is unaffected


def test_a_device_cannot_subscribe_to_another_devices_commands_or_uplink(
    admin: BrokerAdmin, connect: Connect
) -> None:
    account, base = _device(admin)
    _, other_base = _device(admin)
    device = connect(account, account.username)
    for topic in [
        f"{other_base}/cmd",
        "sc/v1/manhole_cover/+/cmd",
        f"{base.rsplit('/', 1)[0]}/+/telemetry",
        f"{other_base}/telemetry",
        f"$share/x/{base}/cmd",
        "sc/v1/#",
        "#",
        "$SYS/#",
        "$CONTROL/dynamic-security/v1/response",
    ]:
        reason = device.subscribe(topic)
        assert reason.value == NOT_AUTHORIZED, f"{topic}: {reason}"
    assert not device.subscribe(f"{base}/cmd").is_failure


def test_the_client_id_is_bound_to_the_device(admin: BrokerAdmin, connect: Connect) -> None:
    account, _ = _device(admin)
    other, _ = _device(admin)
    assert connect(account, "not-the-device-id").connack.value == NOT_AUTHORIZED  # type: ignore[union-attr]
    # Another device's credentials cannot take this device's client id (and so its session) either.
    assert connect(other, account.username).connack.value == NOT_AUTHORIZED  # type: ignore[union-attr]
    assert connect(account, account.username).accepted


def test_disabling_a_device_cuts_it_off_at_once_until_it_is_enabled(
    admin: BrokerAdmin, connect: Connect
) -> None:
    account, base = _device(admin)
    device = connect(account, account.username)
    assert device.accepted

    admin.disable(account.username)
    # cut off by the broker itself (not by a later reconnect): the reason says so
    reason = device.wait_disconnected(timeout=10)
    assert reason.value == ADMINISTRATIVE_ACTION, reason
    assert admin.is_disabled(account.username)
    assert connect(account, account.username).connack.value == NOT_AUTHORIZED  # type: ignore[union-attr]

    admin.enable(account.username)
    again = connect(account, account.username)
    assert again.accepted
    assert again.publish(f"{base}/telemetry").value != NOT_AUTHORIZED


def test_a_rotated_password_stops_the_old_one(admin: BrokerAdmin, connect: Connect) -> None:
    account, _ = _device(admin)
    device = connect(account, account.username)
    assert device.accepted

    new_password = admin.rotate_password(account.username)
    assert new_password != account.password and len(new_password) >= 43
    # A session on the old password does not outlive the rotation.
    assert device.wait_disconnected(timeout=10).value == ADMINISTRATIVE_ACTION
    assert connect(account, account.username).connack.value == NOT_AUTHORIZED  # type: ignore[union-attr]
    assert connect(Credentials(account.username, new_password), account.username).accepted


def test_a_deleted_device_is_cut_off_and_its_role_removed(admin: BrokerAdmin, connect: Connect) -> None:
    account, _ = _device(admin)
    device = connect(account, account.username)
    admin.delete(account.username)
    assert device.wait_disconnected(timeout=10).value == ADMINISTRATIVE_ACTION
    assert not admin.exists(account.username)
    assert connect(account, account.username).connack.value == NOT_AUTHORIZED  # type: ignore[union-attr]
    with pytest.raises(BrokerAdminError, match="Role not found"):
        admin.command("getRole", rolename=device_role(account.username))
    with pytest.raises(BrokerAdminError, match="Client not found"):
        admin.rotate_password(account.username)


def test_creating_an_existing_device_is_an_error(admin: BrokerAdmin) -> None:
    account, _ = _device(admin)
    with pytest.raises(BrokerAdminError, match="Client already exists") as caught:
        admin.create_device(account.username, "manhole_cover")
    assert caught.value.command == "createClient"
    with pytest.raises(BrokerAdminError, match="Client already exists"):
        admin.create_devices(
            [(f"new-{uuid.uuid4().hex[:8]}", "streetlight"), (account.username, "manhole_cover")]
        )
    with pytest.raises(ValueError, match="device id"):
        admin.create_device("bad/id", "manhole_cover")
    with pytest.raises(ValueError, match="device type"):
        admin.create_device("fine-id", "toaster")


def test_devices_created_in_a_batch_each_get_their_own_account(admin: BrokerAdmin, connect: Connect) -> None:
    prefix = f"batch-{uuid.uuid4().hex[:6]}"
    wanted = [(f"{prefix}-{i:03d}", ("streetlight", "smoke_detector")[i % 2]) for i in range(25)]
    admin.batch_size = 10  # three messages
    passwords = admin.create_devices(wanted)
    assert sorted(passwords) == [d for d, _ in wanted]
    assert len(set(passwords.values())) == len(wanted)
    first_id, first_type = wanted[0]
    first = connect(Credentials(first_id, passwords[first_id]), first_id)
    assert first.publish(f"sc/v1/{first_type}/{first_id}/telemetry").value != NOT_AUTHORIZED
    assert first.publish(f"sc/v1/{wanted[1][1]}/{wanted[1][0]}/telemetry").value == NOT_AUTHORIZED


def test_the_gateway_and_adaptor_accounts_have_only_their_rights(
    mosquitto: MosquittoService, admin: BrokerAdmin, connect: Connect
) -> None:
    _, base = _device(admin)
    gateway = connect(mosquitto.gateway_account, f"gw-{uuid.uuid4().hex[:8]}")
    assert admin.get_client(mosquitto.gateway_account.username)["roles"] == [{"rolename": GATEWAY_ROLE}]
    assert admin.get_client(mosquitto.publisher_account.username)["roles"] == [{"rolename": ADAPTOR_ROLE}]
    for topic in ("sc/v1/+/+/telemetry", "sc/v1/smoke_detector/+/event", "$share/any/sc/v1/+/+/status"):
        assert not gateway.subscribe(topic).is_failure, topic
    for topic in ("#", "sc/v1/#", "sc/v1/+/+/cmd", "$SYS/#", "$CONTROL/dynamic-security/v1/response"):
        assert gateway.subscribe(topic).value == NOT_AUTHORIZED, topic
    assert gateway.publish(f"{base}/telemetry").value == NOT_AUTHORIZED  # it cannot forge readings
    assert gateway.publish(f"{base}/cmd").value != NOT_AUTHORIZED
    assert gateway.publish("sc/v1/incidents/opened").value != NOT_AUTHORIZED

    adaptor = connect(mosquitto.publisher_account, f"adaptor-{uuid.uuid4().hex[:8]}")
    for kind in ("telemetry", "event", "status"):
        assert adaptor.publish(f"{base}/{kind}").value != NOT_AUTHORIZED
    assert adaptor.publish(f"{base}/cmd").value == NOT_AUTHORIZED
    assert adaptor.publish("sc/v1/incidents/x").value == NOT_AUTHORIZED
    assert adaptor.subscribe("sc/v1/+/+/telemetry").value == NOT_AUTHORIZED


def test_ensure_roles_is_idempotent_and_does_not_disconnect_the_gateway(
    mosquitto: MosquittoService, admin: BrokerAdmin, connect: Connect
) -> None:
    gateway = connect(mosquitto.gateway_account, f"gw-{uuid.uuid4().hex[:8]}")
    before = mosquitto.dynsec_path.stat().st_mtime_ns
    admin.ensure_roles()
    admin.ensure_roles()
    assert mosquitto.dynsec_path.stat().st_mtime_ns == before, "nothing to change, nothing written"
    with pytest.raises(queue.Empty):
        gateway.wait_disconnected(timeout=0.5)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_accounts_and_the_admin_password_survive_a_restart(service_dir: Path, connect: Connect) -> None:
    with start_mosquitto(service_dir) as broker:
        admin_password = broker.admin_password
        assert len(admin_password) >= 43
        saved = json.loads((service_dir / "admin.json").read_text())
        assert saved == {"username": broker.admin_username, "password": admin_password}
        assert _mode(service_dir / "admin.json") == 0o600
        assert _mode(broker.dynsec_path) == 0o600
        assert admin_password not in broker.dynsec_path.read_text()  # only its hash is there

        assert connect(None, "anon", broker).connack.value == NOT_AUTHORIZED  # type: ignore[union-attr]
        gateway = broker.gateway_account
        with broker.admin() as admin:
            password = admin.create_device("survivor-1", "parking_sensor")
            admin.create_device("gone-1", "parking_sensor")
            admin.disable("gone-1")
        device = Credentials("survivor-1", password)
        assert connect(device, "survivor-1", broker).accepted

        broker.restart()
        assert broker.admin_password == admin_password
        assert _mode(broker.dynsec_path) == 0o600  # the plugin's own rewrite keeps it private
        assert connect(device, "survivor-1", broker).accepted
        assert connect(gateway, "gw-after-restart", broker).accepted
        with broker.admin() as admin:
            assert admin.is_disabled("gone-1")
        broker.stop()

    # A new start on the same data dir (a new process, say) finds the same admin and service accounts.
    with start_mosquitto(service_dir) as again:
        assert again.admin_password == admin_password
        assert again.gateway_account == gateway
        assert connect(device, "survivor-1", again).accepted
        assert connect(None, "anon", again).connack.value == NOT_AUTHORIZED  # type: ignore[union-attr]


def test_mosquitto_does_not_substitute_the_username_in_acls(admin: BrokerAdmin, connect: Connect) -> None:
    """Why each device has a role of its own: Mosquitto 2.0's dynamic security plugin takes %u (and %c)
    in an ACL topic literally. If a later Mosquitto substitutes it, one role per device type would do."""
    username = f"svc.probe-{uuid.uuid4().hex[:8]}"
    role = f"probe-{uuid.uuid4().hex[:8]}"
    admin.command("createRole", rolename=role, acls=[_probe_acl("probe/%u/telemetry")])
    try:
        password = admin.create_service_account(username, role)
        probe = connect(Credentials(username, password), username)
        assert probe.publish(f"probe/{username}/telemetry").value == NOT_AUTHORIZED
        assert probe.publish("probe/%u/telemetry").value != NOT_AUTHORIZED
    finally:
        admin.delete(username)
        admin.command("deleteRole", rolename=role)


def _probe_acl(topic: str) -> dict[str, object]:
    return {"acltype": "publishClientSend", "topic": topic, "priority": 0, "allow": True}
