"""What the routes work with, made once per app: the stores and the installers' operations."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from sqlalchemy import Engine

from api.auth import ApiKeyStore, UserStore
from api.readings import InfluxReader
from api.settings import ApiSettings
from gateway.deadletter import DeadLetterStore, DeviceStateStore
from gateway.incident_store import IncidentStore
from gateway.installers import CredentialIssuer, Installers
from gateway.registry import Places, Registry, ResponsibleUnits


@dataclass(frozen=True)
class Services:
    settings: ApiSettings
    engine: Engine
    registry: Registry
    installers: Installers
    places: Places
    units: ResponsibleUnits
    deadletters: DeadLetterStore
    states: DeviceStateStore
    keys: ApiKeyStore
    incidents: IncidentStore
    users: UserStore
    #: the managers' readings (InfluxDB); closed with the app
    readings: InfluxReader

    @classmethod
    def make(cls, settings: ApiSettings, engine: Engine, issuer: CredentialIssuer) -> Services:
        registry = Registry(engine, code_scheme=settings.code_scheme)
        return cls(
            settings=settings,
            engine=engine,
            registry=registry,
            installers=Installers(registry, issuer),
            places=Places(engine),
            units=ResponsibleUnits(engine),
            deadletters=DeadLetterStore(engine),
            states=DeviceStateStore(engine),
            keys=ApiKeyStore(engine),
            incidents=IncidentStore.configured(engine, settings),
            users=UserStore(engine),
            readings=InfluxReader(
                settings.influx_url,
                settings.influx_db,
                rp=settings.influx_rp,
                username=settings.influx_username,
                password=None
                if settings.influx_password is None
                else settings.influx_password.get_secret_value(),
                timeout_s=settings.influx_query_timeout_s,
            ),
        )


def services(request: Request) -> Services:
    found = request.app.state.services
    assert isinstance(found, Services)
    return found
