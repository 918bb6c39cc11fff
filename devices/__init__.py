"""Device types: one folder per type, each declaring its thing model; this module lists them explicitly."""

from devices.access_control import THING as ACCESS_CONTROL
from devices.manhole_cover import THING as MANHOLE_COVER
from devices.model import DEVICE_ID_RE, MAX_PAYLOAD_BYTES, Event, Field, ThingModel
from devices.parking_sensor import THING as PARKING_SENSOR
from devices.smoke_detector import THING as SMOKE_DETECTOR
from devices.streetlight import THING as STREETLIGHT

THING_MODELS: dict[str, ThingModel] = {
    m.type: m for m in (MANHOLE_COVER, STREETLIGHT, ACCESS_CONTROL, PARKING_SENSOR, SMOKE_DETECTOR)
}
DEVICE_TYPES: tuple[str, ...] = tuple(THING_MODELS)

__all__ = [
    "DEVICE_ID_RE",
    "DEVICE_TYPES",
    "MAX_PAYLOAD_BYTES",
    "THING_MODELS",
    "Event",
    "Field",
    "ThingModel",
]
