"""The API's settings: the broker and registry ones the installers' tools share, plus where to listen."""

from __future__ import annotations

from pydantic import Field
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
