"""access_control: door / gate access controller (门禁)."""

from devices.model import Event, Field, ThingModel

METHODS = ("card", "face", "qr", "password", "fingerprint", "remote", "button")
DENY_REASONS = ("unknown_credential", "expired", "out_of_schedule", "no_permission", "mismatch")

_method = Field("method", kind=str, choices=METHODS, required=True, description="how access was attempted")
_credential = Field(
    "credential",
    kind=str,
    max_length=256,
    description="opaque credential id; personal data: stored only as a keyed hash (credential_hash)",
)

THING = ThingModel(
    type="access_control",
    name_zh="门禁",
    name_en="Door / gate access controller",
    commissioning_fields=("door_open",),
    report_interval_s=300,
    description="Door state and access events of a door or gate controller.",
    telemetry=(
        Field("door_open", kind=bool, description="door open"),
        Field("battery_pct", unit="%", minimum=0, maximum=100, description="battery"),
    ),
    events=(
        Event("access_granted", fields=(_method, _credential), description="access granted"),
        Event(
            "access_denied",
            fields=(
                _method,
                Field(
                    "reason", kind=str, choices=DENY_REASONS, required=True, description="why it was denied"
                ),
                _credential,
            ),
            description="access denied",
        ),
        Event("door_forced_open", description="door opened without a granted access"),
        Event(
            "door_held_open",
            fields=(
                Field(
                    "open_s",
                    unit="s",
                    minimum=0,
                    maximum=10**7,
                    required=True,
                    description="seconds open so far",
                ),
            ),
            description="door held open too long",
        ),
        Event("tamper", description="controller tampered with"),
        Event("duress", description="duress code used"),
    ),
    attributes=(
        Field("door_name", kind=str, description="name of the door"),
        Field("held_open_limit_s", unit="s", minimum=0, maximum=86400, description="held-open limit"),
    ),
)
