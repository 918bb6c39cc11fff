"""Gateway settings: every one from the environment with the SC_ prefix, validated at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_CREDENTIAL_KEY = "dev-only-credential-key-change-me"


class EndpointConfig(BaseModel):
    """One incident-system endpoint (SC_INCIDENT_ENDPOINTS is a JSON list of these).

    `role` "cases" receives every incident change (not commissioning ones); "escalation" (e.g. the
    command centre) receives the changes of escalated incidents only, from the escalation on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", description="stable name (kept in the outbox)")
    url: str = Field(pattern=r"^https?://", description="where events are POSTed")
    secret: SecretStr = Field(description="whsec_ + base64 bytes: the HMAC key of this endpoint")
    role: Literal["cases", "escalation"] = "cases"
    timeout_s: float = Field(5.0, gt=0, le=120, description="no answer within this is a failed attempt")

    @field_validator("secret")
    @classmethod
    def _whsec(cls, value: SecretStr) -> SecretStr:
        from incidents.cloudevents import secret_key

        secret_key(value.get_secret_value())  # raises with the reason
        return value


#: the outbox's pseudo-endpoint of the local MQTT publication (sc/v1/incidents/...)
MQTT_ENDPOINT = "mqtt"


class Settings(BaseSettings):
    """All knobs of one gateway process. `sc-gateway settings` prints them with their descriptions."""

    model_config = SettingsConfigDict(env_prefix="SC_", extra="forbid", validate_default=True)

    environment: Literal["development", "test", "production"] = Field(
        "development", description="production refuses development default secrets"
    )
    instance: str = Field(
        "local",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="name of this gateway installation (CloudEvents source, client ids)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    log_json: bool = Field(False, description="structured JSON log lines instead of text")

    # MQTT
    mqtt_host: str = Field("127.0.0.1", description="Mosquitto host")
    mqtt_port: int = Field(1883, ge=1, le=65535, description="Mosquitto port")
    mqtt_username: str | None = Field(None, description="gateway's broker account")
    mqtt_password: SecretStr | None = Field(None, description="gateway's broker password")
    mqtt_share_group: str = Field(
        "sc-gateway",
        pattern=r"^[A-Za-z0-9_-]{0,64}$",
        description="shared-subscription group: processes in one group share the load; empty = no sharing",
    )
    mqtt_device_types: str = Field(
        "+",
        description="comma-separated device types this process consumes ('+' = all); "
        "lets an operator give smoke detectors their own consumer",
    )
    mqtt_receive_maximum: int = Field(
        10000,
        ge=10,
        le=65535,
        description="MQTT 5 receive maximum: unacknowledged QoS 1 messages the broker may push to us; "
        "the broker holds the rest in the persistent session (backpressure instead of loss)",
    )
    mqtt_session_expiry_s: int = Field(7 * 24 * 3600, ge=0, description="persistent session lifetime")
    mqtt_keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive")
    mqtt_reconnect_max_s: float = Field(30.0, gt=0, description="longest pause between reconnect attempts")

    # InfluxDB
    influx_mode: Literal["v1", "v2"] = Field(
        "v1", description="v1: /write (1.x, and 2.x/3.x v1 compat); v2: /api/v2/write"
    )
    influx_url: str = Field("http://127.0.0.1:8086", description="InfluxDB base URL")
    influx_db: str = Field("sc", description="v1 database (created at start-up if missing)")
    influx_rp: str | None = Field(None, description="v1 retention policy (default: the database's default)")
    influx_username: str | None = Field(None, description="v1 user")
    influx_password: SecretStr | None = Field(None, description="v1 password")
    influx_org: str | None = Field(None, description="v2 organisation")
    influx_bucket: str | None = Field(None, description="v2 bucket")
    influx_token: SecretStr | None = Field(None, description="v2 API token")
    influx_timeout_s: float = Field(10.0, gt=0, description="HTTP timeout of one write")
    influx_create_db: bool = Field(True, description="v1: CREATE DATABASE at start-up")

    # Batching and the spool
    batch_max_points: int = Field(
        5000, ge=1, le=100000, description="a write is sent when it holds this many points"
    )
    batch_max_delay_ms: int = Field(
        200, ge=1, le=60000, description="... or when its oldest point is this old"
    )
    batch_urgent_types: str = Field(
        "smoke_detector",
        description="comma-separated device types whose events do not wait for the batch age: the batch "
        "holding one is written at once (a smoke alarm reaches the rules and the incident system sooner)",
    )
    priority_lane: bool = Field(
        True,
        description="with the rules on, run one more worker that consumes only the events of "
        "SC_BATCH_URGENT_TYPES, so a smoke alarm never queues behind telemetry",
    )
    mqtt_lane: Literal["all", "urgent"] = Field(
        "all", description="set by the supervisor per worker (see SC_PRIORITY_LANE)"
    )
    spool_dir: Path = Field(
        Path(".var/spool"), description="durable on-disk spool used while InfluxDB is unreachable"
    )
    spool_max_bytes: int = Field(
        1 << 30, ge=1 << 16, description="spool bound; when full, intake pauses (broker queues)"
    )
    retry_max_s: float = Field(30.0, gt=0, description="longest pause between InfluxDB retries")

    # Validation
    max_payload_bytes: int = Field(16 * 1024, ge=256, le=1 << 20, description="largest accepted payload")
    ts_future_tolerance_s: int = Field(300, ge=0, description="device times further ahead are not trusted")
    ts_past_tolerance_s: int = Field(7 * 24 * 3600, ge=0, description="device times older are not trusted")
    credential_hash_key: SecretStr = Field(
        SecretStr(DEV_CREDENTIAL_KEY),
        description="HMAC key for access-control credential hashes (keep secret)",
    )

    # Registry / SQL
    database_url: str = Field("sqlite:///.var/registry.db", description="SQLAlchemy URL of the registry")
    registry_refresh_s: float = Field(
        2.0, gt=0, description="how often the in-memory registry checks for changes"
    )
    state_flush_s: float = Field(2.0, gt=0, description="how often online/last-seen state is written")
    deadletter_payload_bytes: int = Field(
        4096, ge=64, le=1 << 20, description="raw payload kept per dead letter"
    )
    deadletter_retention_days: float = Field(
        30.0, gt=0, description="dead letters older than this are deleted (checked hourly)"
    )

    # Rules stage
    rules_enabled: bool = Field(
        True, description="run the rules process: evaluate stored readings, write alarms to SQL"
    )
    rules_dirs: str = Field(
        "",
        description="colon-separated extra rule files or directories of *.yaml, loaded after the "
        "default rules (site rules and overrides); checked at start-up, reloaded when they change",
    )
    rules_state_path: Path = Field(
        Path(".var/rules-state.json"),
        description="where the rules process keeps its state (timers, windows, open alarms) across restarts",
    )
    rules_snapshot_s: float = Field(5.0, gt=0, description="how often the rules state is saved")
    rules_queue_batches: int = Field(
        256,
        ge=1,
        le=100000,
        description="batches in flight from the workers to the rules process; when it falls behind, "
        "workers hold further batches (sc_rules_backlog) and then slow intake, never drop",
    )

    # Incidents and their delivery (shared/spec/incident-delivery.md)
    incidents_enabled: bool = Field(
        True, description="turn alarms into governance incidents (needs SC_RULES_ENABLED)"
    )
    incident_endpoints: list[EndpointConfig] = Field(
        default_factory=list,
        description='JSON list of {"name","url","secret":"whsec_...","role":"cases"|"escalation"}',
    )
    incident_mqtt: bool = Field(
        True, description="also publish every delivered incident change on sc/v1/incidents/{community}/{id}"
    )
    delivery_retry_hours: float = Field(
        48.0, ge=24.0, description="a delivery is retried (backoff with jitter) for at least this long"
    )
    delivery_backoff_max_s: float = Field(
        900.0, ge=1, description="longest pause between two attempts of one delivery"
    )
    delivery_poll_s: float = Field(
        1.0, gt=0, description="how often the delivery process looks for due retries and outside changes"
    )
    escalation_check_s: float = Field(
        5.0, gt=0, description="how often unacknowledged P1 incidents past respond-by are escalated"
    )
    reminder_after_h: dict[str, float] = Field(
        default_factory=lambda: {"P1": 1.0, "P2": 24.0, "P3": 72.0},
        description="JSON {urgency: hours}: an open incident older than this gets an `updated` reminder, "
        "and again every such period; urgencies not named get none",
    )

    # Observability
    metrics_port: int = Field(
        9108,
        ge=0,
        le=65535,
        description="Prometheus /metrics port (0 = off); worker i uses +i, the rules process +SC_WORKERS, "
        "the delivery process +SC_WORKERS+1",
    )
    workers: int = Field(1, ge=1, le=64, description="gateway processes sharing the subscription")

    @field_validator("mqtt_device_types", "batch_urgent_types")
    @classmethod
    def _known_types(cls, value: str) -> str:
        from devices import DEVICE_TYPES

        types = [t.strip() for t in value.split(",") if t.strip()]
        unknown = [t for t in types if t != "+" and t not in DEVICE_TYPES]
        if unknown:
            known = ", ".join(DEVICE_TYPES)
            raise ValueError(f"unknown device type(s) {', '.join(unknown)}; known: +, {known}")
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if (
            self.environment == "production"
            and self.credential_hash_key.get_secret_value() == DEV_CREDENTIAL_KEY
        ):
            raise ValueError("SC_CREDENTIAL_HASH_KEY must be set to a secret in production")
        if self.environment == "production" and (self.mqtt_username is None or self.mqtt_password is None):
            raise ValueError(
                "SC_MQTT_USERNAME and SC_MQTT_PASSWORD (the gateway's account) are required in production"
            )
        if self.workers > 1 and not self.mqtt_share_group:
            raise ValueError("SC_WORKERS > 1 needs SC_MQTT_SHARE_GROUP: each worker would get every message")
        names = [e.name for e in self.incident_endpoints]
        if len(set(names)) != len(names) or MQTT_ENDPOINT in names:
            raise ValueError(f"incident endpoint names must be unique and not {MQTT_ENDPOINT!r}: {names}")
        bad = sorted(set(self.reminder_after_h) - {"P1", "P2", "P3", "P4"})
        if bad or any(h <= 0 for h in self.reminder_after_h.values()):
            raise ValueError("SC_REMINDER_AFTER_H: urgencies P1-P4, hours > 0")
        if self.influx_mode == "v2":
            missing = [n for n in ("influx_org", "influx_bucket", "influx_token") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"influx_mode v2 needs {', '.join('SC_' + m.upper() for m in missing)}")
        return self

    def urgent_types(self) -> frozenset[str]:
        return frozenset(t.strip() for t in self.batch_urgent_types.split(",") if t.strip())

    def rule_paths(self) -> list[Path]:
        """The extra rule files and directories of SC_RULES_DIRS, in order."""
        return [Path(p) for p in self.rules_dirs.split(":") if p.strip()]

    def lane_types(self) -> list[str]:
        """The types whose events the priority worker takes (urgent and consumed by this installation)."""
        from devices import DEVICE_TYPES

        types = [t.strip() for t in self.mqtt_device_types.split(",") if t.strip()] or ["+"]
        known = list(DEVICE_TYPES) if "+" in types else types
        return [t for t in known if t in self.urgent_types()]

    def topic_filters(self, lane: str | None = None) -> list[str]:
        """What a worker subscribes to. Lane "all": every uplink topic of SC_MQTT_DEVICE_TYPES, shared in
        SC_MQTT_SHARE_GROUP; "urgent" (the priority worker): the urgent types' events again, in a group of
        its own, so a smoke alarm reaches a worker with no backlog ahead of it (the "all" workers' copy
        is stored idempotently and dropped by the rules as a duplicate event)."""
        lane = lane or self.mqtt_lane
        types = [t.strip() for t in self.mqtt_device_types.split(",") if t.strip()] or ["+"]
        group = self.mqtt_share_group
        if lane == "urgent":
            filters = [f"sc/v1/{t}/+/event" for t in self.lane_types()]
            group = f"{group}-urgent" if group else ""
        else:
            filters = [f"sc/v1/{t}/+/{kind}" for t in types for kind in ("telemetry", "event", "status")]
        if group:
            filters = [f"$share/{group}/{f}" for f in filters]
        return filters

    def stale_filters(self) -> list[str]:
        """Filters of the other lane: unsubscribed at connect, so a persistent session once used for the
        other lane does not keep them."""
        mine = set(self.topic_filters())
        other = {f for lane in ("all", "urgent") for f in self.topic_filters(lane)}
        return sorted(other - mine)


def describe() -> str:
    """Every setting with its env name, default and meaning (for `sc-gateway settings`)."""
    lines = []
    for name, f in Settings.model_fields.items():
        default = f.get_default(call_default_factory=True)
        default = default.get_secret_value() if isinstance(default, SecretStr) else default
        if "key" in name or "password" in name or "token" in name:
            default = "(secret)" if default else None
        lines.append(f"SC_{name.upper():28} default={default!s:28} {f.description or ''}")
    return "\n".join(lines)
