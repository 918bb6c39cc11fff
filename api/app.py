"""The REST API: `create_app(settings)`; run by `sc-gateway api` (uvicorn).

Routes are grouped by who uses them; this issue brings the installers' (devices, places, responsible
units, commissioning, dead letters), under /api/v1, for API keys of role installer or admin. The
OpenAPI document is at /openapi.json, the browsable one at /docs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import Engine

from api import commissioning, incidents, installers, manager, places, users, webpage
from api.errors import install_error_handlers
from api.services import Services
from api.settings import ApiSettings
from gateway.db import make_engine, require_current_schema
from gateway.installers import BrokerIssuer, CredentialIssuer

API_VERSION = "1"

TAGS = [
    {
        "name": "devices",
        "description": "Register devices with their place, codes and attributes; issue their MQTT "
        "credentials; change, move, cut off, retire; bulk import and export.",
    },
    {
        "name": "commissioning",
        "description": "Which devices of a site or batch are talking and what they sent; unregistered "
        "devices seen on the broker; messages set aside.",
    },
    {"name": "places", "description": "The place hierarchy: district → street → community → grid."},
    {
        "name": "incidents",
        "description": "Governance incidents: the incident system's progress reports (back-channel), "
        "reading incidents with their history, acknowledging, false-alarm counts.",
    },
    {
        "name": "managers",
        "description": "Property managers: incident comments, assignment and live stream; devices with "
        "status and last values; a device's readings over time; counts by place and type.",
    },
    {"name": "responsible units", "description": "Units that act on devices (权属/养护单位)."},
    {"name": "users", "description": "People: log in and out, who am I; the users and their roles (admins)."},
    {"name": "meta", "description": "Liveness."},
]

DESCRIPTION = """\
Every route but the login needs a credential. Machines send an API key: `Authorization: Bearer
sck_<key id>_<secret>` or `X-API-Key: sck_<key id>_<secret>` (made with `sc-gateway apikeys create --name N
--role installer`). People log in with `POST /api/v1/auth/login {username, password}` and send the token
they get: `Authorization: Bearer sct_...`. Missing or bad credential: 401; a role that may not use the
route: 403; a device, incident or place outside the caller's scope: 404, as if it did not exist.

Errors are JSON `{"detail": "what is wrong"}`; 422 adds `errors`, one per field.
"""


def create_app(
    settings: ApiSettings | None = None,
    *,
    engine: Engine | None = None,
    issuer: CredentialIssuer | None = None,
) -> FastAPI:
    """The API on the registry of `settings.database_url` (or `engine`), issuing credentials through
    the broker of `settings` (or `issuer`). Refuses a database that is not migrated (at once, not on
    the first request)."""
    settings = settings or ApiSettings()
    own_engine = engine is None
    engine = engine or make_engine(settings.database_url)
    require_current_schema(engine)
    broker: BrokerIssuer | None = None
    if issuer is None:
        issuer = broker = BrokerIssuer(settings)
    svc = Services.make(settings, engine, issuer)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        svc.readings.close()
        if broker is not None:
            broker.close()
        if own_engine:
            engine.dispose()

    app = FastAPI(
        title="sc-gateway API",
        version=API_VERSION,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    app.state.services = svc
    install_error_handlers(app)
    app.include_router(installers.router)
    app.include_router(commissioning.router)
    app.include_router(places.router)
    # before incidents: /incidents/stream must not be taken for /incidents/{incident_id}
    app.include_router(manager.router)
    app.include_router(incidents.router)
    app.include_router(users.router)
    app.include_router(webpage.router)  # the managers' web page: / and /app/... (static, no data)

    @app.get("/healthz", tags=["meta"], summary="The API is up (no key needed)")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
