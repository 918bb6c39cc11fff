"""streetlight: street lamp / multi-function smart pole (路灯/多功能灯杆)."""

from devices.model import Event, Field, ThingModel

THING = ThingModel(
    type="streetlight",
    name_zh="路灯/多功能灯杆",
    name_en="Street lamp / smart pole",
    commissioning_fields=("lamp_on", "voltage_v", "power_w"),
    report_interval_s=600,
    description=(
        "Lamp state, electrical readings, leakage, pole tilt and ambient light"
        " of a street lamp or smart pole."
    ),
    telemetry=(
        Field("lamp_on", kind=bool, description="lamp switched on"),
        Field("dimming_pct", unit="%", minimum=0, maximum=100, description="dimming level"),
        Field("voltage_v", unit="V AC", minimum=0, maximum=300, description="supply voltage"),
        Field("current_a", unit="A", minimum=0, maximum=20, description="lamp current"),
        Field("power_w", unit="W", minimum=0, maximum=2000, description="active power"),
        Field("power_factor", minimum=0, maximum=1, description="power factor"),
        Field("energy_kwh", unit="kWh", minimum=0, description="cumulative energy"),
        Field("leakage_ma", unit="mA", minimum=0, maximum=1000, description="residual (leakage) current"),
        Field("pole_tilt_deg", unit="°", minimum=0, maximum=90, description="pole tilt from vertical"),
        Field("lux", unit="lx", minimum=0, maximum=200000, description="ambient light"),
    ),
    events=(
        Event("emergency_call", description="the pole's one-button help call"),
        Event("hatch_open", description="maintenance hatch opened"),
        Event("hatch_closed", description="maintenance hatch closed"),
        Event("lamp_fault", description="lamp driver reports a fault"),
    ),
    attributes=(
        Field("rated_power_w", unit="W", minimum=0, maximum=2000, description="rated lamp power"),
        Field("schedule", kind=str, description="on/off schedule, e.g. 18:00-06:00"),
        Field("circuit", kind=str, description="supply circuit the pole is on"),
    ),
)
