"""smoke_detector: independent smoke alarm, NB-IoT (独立式感烟火灾探测报警器)."""

from devices.model import Event, Field, ThingModel

THING = ThingModel(
    type="smoke_detector",
    name_zh="独立式感烟火灾探测报警器",
    name_en="Independent smoke alarm (NB-IoT)",
    commissioning_fields=("alarm", "battery_pct"),
    report_interval_s=86400,
    description="A stand-alone smoke alarm that reports its alarm state, smoke density and heartbeats.",
    telemetry=(
        Field("alarm", kind=bool, description="the device's own smoke alarm state"),
        Field("smoke_obscuration_pct_m", unit="%/m", minimum=0, maximum=100, description="smoke obscuration"),
        Field("temperature_c", unit="°C", minimum=-40, maximum=125, description="temperature"),
        Field("battery_pct", unit="%", minimum=0, maximum=100, description="battery"),
        Field("rssi_dbm", unit="dBm", minimum=-140, maximum=0, description="radio signal strength"),
    ),
    events=(
        Event("smoke_alarm", description="smoke alarm raised"),
        Event("alarm_cleared", description="alarm cleared"),
        Event("silenced", description="alarm silenced by a person"),
        Event("low_battery", description="battery low"),
        Event("fault", description="sensor fault"),
        Event("removed", description="taken off its base"),
        Event("installed", description="put on its base"),
        Event("self_test", description="self test run"),
    ),
    attributes=(Field("floor", kind=int, minimum=-10, maximum=300, description="floor the detector is on"),),
)
