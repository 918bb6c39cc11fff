"""parking_sensor: geomagnetic parking bay sensor (地磁车位检测器)."""

from devices.model import Field, ThingModel

THING = ThingModel(
    type="parking_sensor",
    name_zh="地磁车位检测器",
    name_en="Geomagnetic parking bay sensor",
    commissioning_fields=("occupied",),
    report_interval_s=86400,
    description="Occupancy of one parking bay from the disturbance of the earth's magnetic field.",
    telemetry=(
        Field("occupied", kind=bool, description="a vehicle is in the bay"),
        Field("mag_x", unit="µT", minimum=-2000, maximum=2000, description="magnetic field, x axis"),
        Field("mag_y", unit="µT", minimum=-2000, maximum=2000, description="magnetic field, y axis"),
        Field("mag_z", unit="µT", minimum=-2000, maximum=2000, description="magnetic field, z axis"),
        Field("temperature_c", unit="°C", minimum=-40, maximum=85, description="temperature"),
        Field("battery_pct", unit="%", minimum=0, maximum=100, description="battery"),
        Field("rssi_dbm", unit="dBm", minimum=-140, maximum=0, description="radio signal strength"),
    ),
    attributes=(
        Field(
            "bay_kind",
            kind=str,
            choices=("normal", "fire_lane", "no_parking", "time_limited"),
            description="kind of bay, set by the installer",
        ),
        Field(
            "time_limit_min", unit="min", minimum=0, maximum=100000, description="limit of a time-limited bay"
        ),
    ),
)
