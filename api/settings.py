"""The API's settings: the broker and registry ones the installers' tools share, plus where to listen."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from gateway.installers import InstallerSettings
from gateway.settings import EndpointConfig


class ApiSettings(InstallerSettings):
    """Settings of `sc-gateway api`, from SC_* variables (the rest in `InstallerSettings`)."""

    model_config = SettingsConfigDict(env_prefix="SC_", extra="ignore", validate_default=True)

    database_url: str = Field("sqlite:///.var/registry.db", description="SQLAlchemy URL of the registry")
    api_host: str = Field("127.0.0.1", description="address the API listens on")
    api_port: int = Field(8080, ge=1, le=65535, description="port the API listens on")
    api_max_import_bytes: int = Field(
        64 << 20, ge=1024, description="largest import request body (a 100,000-row CSV is about 15 MB)"
    )

    # the same as the gateway's: changes made through the API (case reports, acknowledgements) are
    # delivered like the rules process's
    instance: str = Field("local", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="CloudEvents source name")
    incident_endpoints: list[EndpointConfig] = Field(
        default_factory=list, description="the incident-system endpoints (see `sc-gateway settings`)"
    )
    incident_mqtt: bool = Field(True, description="incident changes are also published on MQTT")

    # where the managers' readings come from: the gateway's InfluxDB (the same SC_INFLUX_* variables)
    influx_url: str = Field("http://127.0.0.1:8086", description="InfluxDB base URL (v1 /query)")
    influx_db: str = Field("sc", description="the v1 database the gateway writes to")
    influx_rp: str | None = Field(None, description="v1 retention policy to read (default: the database's)")
    influx_username: str | None = Field(None, description="v1 user for reads")
    influx_password: SecretStr | None = Field(None, description="v1 password for reads")
    influx_query_timeout_s: float = Field(10.0, gt=0, description="HTTP timeout of one readings query")
    # the incidents' live stream (GET /api/v1/incidents/stream)
    api_stream_poll_s: float = Field(
        0.5, gt=0, le=60, description="how often the stream looks for new incident changes"
    )
    api_stream_keepalive_s: float = Field(
        15.0, gt=0, le=300, description="a keep-alive comment after this long without an event"
    )
