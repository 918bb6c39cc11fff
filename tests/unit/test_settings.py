"""Settings: a bad one fails start-up with a message naming it."""

import pytest
from pydantic import ValidationError

from gateway.settings import Settings


def test_defaults_subscribe_to_every_type_through_the_share_group() -> None:
    s = Settings()
    assert "$share/sc-gateway/sc/v1/+/+/telemetry" in s.topic_filters()
    assert len(s.topic_filters()) == 3


def test_a_dedicated_smoke_consumer() -> None:
    s = Settings(mqtt_device_types="smoke_detector")
    assert s.topic_filters() == [
        f"$share/sc-gateway/sc/v1/smoke_detector/+/{k}" for k in ("telemetry", "event", "status")
    ]


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"SC_MQTT_PORT": "abc"}, "mqtt_port"),
        ({"SC_MQTT_DEVICE_TYPES": "fridge"}, "fridge"),
        ({"SC_INFLUX_MODE": "v2"}, "SC_INFLUX_ORG"),
        ({"SC_ENVIRONMENT": "production"}, "SC_CREDENTIAL_HASH_KEY"),
        ({"SC_ENVIRONMENT": "production", "SC_CREDENTIAL_HASH_KEY": "s3cret-key"}, "SC_MQTT_USERNAME"),
        ({"SC_BATCH_MAX_POINTS": "0"}, "batch_max_points"),
    ],
)
def test_bad_settings_fail_with_the_setting_named(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], needle: str
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert needle in str(exc.value)
