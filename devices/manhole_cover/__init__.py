"""manhole_cover: smart manhole cover (智能井盖)."""

from devices.model import Field, ThingModel

THING = ThingModel(
    type="manhole_cover",
    name_zh="智能井盖",
    name_en="Smart manhole cover",
    commissioning_fields=("tilt_deg", "cover_open", "battery_pct"),
    report_interval_s=3600,
    description="Tilt, open state, water level and gas in the well below a city manhole cover.",
    telemetry=(
        Field(
            "tilt_deg",
            unit="°",
            minimum=0,
            maximum=180,
            description="tilt relative to the installed position",
        ),
        Field("cover_open", kind=bool, description="cover lifted off its frame"),
        Field(
            "water_level_cm",
            unit="cm",
            minimum=0,
            maximum=2000,
            description="distance down from the cover to the water surface",
        ),
        Field("ch4_lel_pct", unit="%LEL", minimum=0, maximum=100, description="combustible gas"),
        Field("h2s_ppm", unit="ppm", minimum=0, maximum=500, description="hydrogen sulphide"),
        Field("co_ppm", unit="ppm", minimum=0, maximum=2000, description="carbon monoxide"),
        Field("o2_pct", unit="% vol", minimum=0, maximum=30, description="oxygen"),
        Field("temperature_c", unit="°C", minimum=-40, maximum=125, description="temperature in the well"),
        Field("battery_pct", unit="%", minimum=0, maximum=100, description="battery"),
        Field("rssi_dbm", unit="dBm", minimum=-140, maximum=0, description="radio signal strength"),
    ),
    events=(),
    attributes=(
        Field(
            "owner_class",
            kind=str,
            description="minor component class of the cover's owner, e.g. 0111 燃气井盖",
        ),
        Field("tilt_baseline_deg", unit="°", minimum=0, maximum=180, description="tilt at installation"),
        Field("depth_cm", unit="cm", minimum=0, maximum=5000, description="depth of the well"),
    ),
)
