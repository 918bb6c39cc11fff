"""A paho MQTT 5 test client that records what the broker answers (CONNACK, PUBACK, SUBACK, kicks),
shared by the broker account tests (credentials, device-auth plugin, adaptors). The `connect` and `admin`
fixtures that make them live in tests/integration/conftest.py."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from gateway.broker_admin import Credentials
from stack.services import MosquittoService

TIMEOUT_S = 10
NOT_AUTHORIZED = 0x87  # MQTT 5 reason code in CONNACK, PUBACK and SUBACK
ADMINISTRATIVE_ACTION = 0x98  # MQTT 5 DISCONNECT reason code


class Client:
    """A paho MQTT 5 client on its network thread that records what the broker answers.

    It does not reconnect by itself within a test (the reconnect delay is long), so a broker's refusal or
    kick stays visible; a new Client is a new attempt.
    """

    def __init__(self, broker: MosquittoService, account: Credentials | None, client_id: str) -> None:
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        if account is not None:
            self.client.username_pw_set(account.username, account.password)
        self.client.reconnect_delay_set(120, 120)
        self.connack: ReasonCode | None = None
        self.disconnects: queue.Queue[ReasonCode] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._acks: dict[int, ReasonCode] = {}
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda _c, _u, _f, reason, _p: self.disconnects.put(reason)
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)
        self.client.on_publish = lambda _c, _u, mid, reason, _p: self._ack(mid, reason)
        self.client.on_subscribe = lambda _c, _u, mid, reasons, _p: self._ack(mid, reasons[0])
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        assert self._connected.wait(TIMEOUT_S), f"{client_id}: no CONNACK"

    def _on_connect(self, _c: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        self.connack = reason
        self._connected.set()

    def _ack(self, mid: int, reason: ReasonCode) -> None:
        with self._cond:
            self._acks[mid] = reason
            self._cond.notify_all()

    def _wait_ack(self, mid: int) -> ReasonCode:
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._acks, TIMEOUT_S), "no answer from the broker"
            return self._acks[mid]

    @property
    def accepted(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    @property
    def refused(self) -> bool:
        return self.connack is not None and self.connack.value == NOT_AUTHORIZED

    def allowed(self, topic: str, payload: bytes = b"{}") -> bool:
        """Published and accepted (PUBACK without "not authorized")."""
        return self.publish(topic, payload).value != NOT_AUTHORIZED

    def publish(self, topic: str, payload: bytes = b"{}") -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK's reason code."""
        return self._wait_ack(self.client.publish(topic, payload, qos=1).mid)

    def subscribe(self, topic: str) -> ReasonCode:
        """Subscribe at QoS 1 and return the SUBACK's reason code."""
        _, mid = self.client.subscribe(topic, qos=1)
        return self._wait_ack(mid)

    def receive(self, timeout: float = TIMEOUT_S) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def wait_disconnected(self, timeout: float = TIMEOUT_S) -> ReasonCode:
        return self.disconnects.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


Connect = Callable[..., Client]


def nothing_more(client: Client, wait_s: float = 0.5) -> None:
    """Fail if `client` receives a message within `wait_s`."""
    with pytest.raises(queue.Empty):
        message = client.receive(timeout=wait_s)
        pytest.fail(f"unexpected message on {message.topic}: {message.payload!r}")
