"""Every route's role and scope, route by route, against a real SQLite database.

ROUTES holds one entry per route of the app: the roles that may use it, a harmless probe request, and
how the caller's scope applies to it (a check run with scoped API keys and logged-in people). A route
without an entry fails `test_every_route_has_an_entry`: add its entry (roles and scope) with the route.

The world: two districts, each with a street, a community, a grid, a device and an open incident.
Inside: 东城区 / 东华门街道 / 东华门社区 (device in-1). Outside: 西城区 / 西长安街街道 / 西长安街社区
(device out-1). The scoped callers reach only the inside one, each by another level of the hierarchy.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Final

import anyio
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine

from api.app import create_app
from api.auth import API_ROLES, ApiKeyStore, Scope, ScryptParams, UserStore
from api.settings import ApiSettings
from gateway.db import make_engine, migrate
from gateway.deadletter import DeadLetter, DeadLetterStore
from gateway.incident_store import IncidentStore
from gateway.registry import (
    DeviceRecord,
    PlaceRecord,
    Places,
    Registry,
    ResponsibleUnitRecord,
    ResponsibleUnits,
)
from tests.integration.test_incident_store import at, verdict

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from fastapi.testclient import TestClient

PASSWORD: Final = "correct horse battery"
INSIDE: Final = {"district": "东城区", "street": "东华门街道", "community": "东华门社区"}
OUTSIDE: Final = {"district": "西城区", "street": "西长安街街道", "community": "西长安街社区"}
CODES: Final = {"in": "110101001001", "out": "110102001001"}  # community codes; + "001" the grid
#: Text that shows a listing let something of the outside place through.
OUTSIDE_MARKERS: Final = ("out-1", "西城区", "西长安街", "110102")
NO_INCIDENT: Final = "INC-20261121-999999"

#: (method, url, keyword arguments of TestClient.request)
Request = tuple[str, str, dict[str, Any]]


@dataclass
class World:
    client: TestClient
    engine: Engine
    #: credential headers by caller name (see CALLERS)
    headers: dict[str, dict[str, str]]
    incident_in: str
    incident_out: str
    roles: dict[str, str] = field(default_factory=dict)

    def call(self, caller: str | None, request: Request) -> Any:
        method, url, kwargs = request
        headers = {**(self.headers[caller] if caller else {}), **kwargs.pop("headers", {})}
        return self.client.request(method, url, headers=headers, **kwargs)

    def status_only(self, caller: str, request: Request) -> int:
        """The status of a GET, without reading its body: for an endless stream, whose 200 a test
        client would wait on for ever. The app is called over ASGI and stopped at the response start."""
        method, url, kwargs = request
        path, _, query = url.partition("?")
        headers = {**self.headers[caller], **kwargs.get("headers", {})}
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": urllib.parse.quote(query, safe="=&").encode(),
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
            "client": ("127.0.0.1", 1),
            "server": ("testserver", 80),
        }
        started: list[int] = []

        class Started(Exception):
            pass

        received: list[bool] = []

        async def receive() -> dict[str, Any]:
            if received:  # the request was read: the client is gone
                return {"type": "http.disconnect"}
            received.append(True)
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                started.append(message["status"])
                raise Started

        async def run() -> None:
            try:
                await self.client.app(scope, receive, send)
            except BaseException:
                if not started:
                    raise

        anyio.run(run)
        return started[0]


#: How the scope applies to a route: a check run with the roles the route allows.
ScopeCheck = Callable[["World", frozenset[str]], None]

#: Unscoped API keys, one per role (the role checks).
ROLE_CALLERS: Final = {role: (role, Scope(), "key") for role in API_ROLES}
#: Scoped callers: (role, scope, key or user). Each reaches the inside place only, by another level.
SCOPED_CALLERS: Final = {
    "installer@community": ("installer", Scope(communities=(INSIDE["community"],)), "key"),
    "installer@community-user": ("installer", Scope(communities=(INSIDE["community"],)), "user"),
    "manager@community": ("manager", Scope(communities=(INSIDE["community"],)), "user"),
    "manager@community-key": ("manager", Scope(communities=(INSIDE["community"],)), "key"),
    "viewer@street": ("viewer", Scope(streets=(INSIDE["street"],)), "user"),
    "viewer@district": ("viewer", Scope(districts=(INSIDE["district"],)), "key"),
    "incident_system@community": ("incident_system", Scope(communities=(INSIDE["community"],)), "key"),
}
CALLERS: Final = {**ROLE_CALLERS, **SCOPED_CALLERS}


def _device(device_id: str, place: dict[str, str], code: str) -> DeviceRecord:
    return DeviceRecord.model_validate(
        {"device_id": device_id, "device_type": "manhole_cover", **place, "grid_code": code + "001"}
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    url = f"sqlite:///{tmp_path_factory.mktemp('scope') / 'api.db'}"
    migrate(url)
    engine = make_engine(url)
    places = Places(engine)
    for place, code in ((INSIDE, CODES["in"]), (OUTSIDE, CODES["out"])):
        for level, length in (("district", 6), ("street", 9), ("community", 12)):
            places.add(PlaceRecord(code=code[:length], name=place[level]))
        places.add(PlaceRecord(code=code + "001", name=f"{place['community']} 1 号网格"))
    ResponsibleUnits(engine).add(ResponsibleUnitRecord(unit_id="water", name="市自来水集团"))
    registry = Registry(engine)
    registry.add(_device("in-1", INSIDE, CODES["in"]))
    registry.add(_device("out-1", OUTSIDE, CODES["out"]))
    for device_id in ("in-1", "out-1"):
        registry.confirm(device_id)  # in service: their incidents are not commissioning noise
    DeadLetterStore(engine).add_many(
        [
            DeadLetter(at(0), f"sc/v1/manhole_cover/{d}/telemetry", d, "manhole_cover", "bad_json", "x", b"{")
            for d in ("in-1", "out-1", "ghost-1")
        ]
    )
    store = IncidentStore(engine, ["city"])
    incident_ids = []
    for device_id, code in (("in-1", CODES["in"]), ("out-1", CODES["out"])):
        device = registry.describe(device_id)
        assert device is not None
        v = replace(verdict(device_id=device_id), community=device.community, grid_code=code + "001")
        opened = store.apply(v, device, at(0))
        assert opened is not None
        incident_ids.append(opened[0].incident_id)

    app: FastAPI = create_app(ApiSettings(), engine=engine, issuer=None)
    users = UserStore(engine, password_params=ScryptParams(n=2**10, r=8, p=1))
    app.state.services = dataclasses.replace(app.state.services, users=users)
    keys = ApiKeyStore(engine)
    with TestClient(app) as client:
        headers: dict[str, dict[str, str]] = {}
        for name, (role, scope, kind) in CALLERS.items():
            if kind == "key":
                headers[name] = {"X-API-Key": keys.create(name, role, scope)[1]}
            else:
                username = name.replace("@", ".")
                users.create(username, role=role, password=PASSWORD, scope=scope)
                token = users.login(username, PASSWORD).token
                headers[name] = {"Authorization": f"Bearer {token}"}
        yield World(
            client,
            engine,
            headers,
            incident_ids[0],
            incident_ids[1],
            roles={name: role for name, (role, _, _) in CALLERS.items()},
        )
    engine.dispose()


# ---------------------------------------------------------------------------------------------
# Scope checks, one kind per way a scope applies to a route


def scoped_callers(world: World, roles: frozenset[str]) -> list[str]:
    found = [name for name in SCOPED_CALLERS if world.roles[name] in roles]
    assert found, f"no scoped caller has one of the roles {sorted(roles)}"
    return found


def unscoped_callers(roles: frozenset[str]) -> list[str]:
    return [role for role in ROLE_CALLERS if role in roles]


def outside_is_not_found(outside: Request, missing: Request, *, inside: Request | None = None) -> ScopeCheck:
    """A single object outside the scope is answered to a scoped caller as one that does not exist (404,
    the same words as for `missing`); `inside` (a read), when given, is answered 200."""

    def check(world: World, roles: frozenset[str]) -> None:
        for caller in scoped_callers(world, roles):
            gone = world.call(caller, _copy(missing))
            assert gone.status_code == 404, (caller, gone.text)
            r = world.call(caller, _copy(outside))
            assert r.status_code == 404, (caller, r.status_code, r.text)
            assert _same_words(r.json()["detail"], gone.json()["detail"], outside, missing), (caller, r.text)
            if inside is not None:
                ok = world.call(caller, _copy(inside))
                assert ok.status_code == 200, (caller, ok.text)

    return check


def listing_stays_inside(request: Request, *, shows_inside: str | None = None) -> ScopeCheck:
    """A listing holds nothing of the outside place for a scoped caller, while an unscoped one sees it
    (so the data to leak is there); `shows_inside`: a text a scoped caller of a community scope sees."""

    def check(world: World, roles: frozenset[str]) -> None:
        everyone = [world.call(c, _copy(request)) for c in unscoped_callers(roles)]
        assert any(any(m in r.text for m in OUTSIDE_MARKERS) for r in everyone), "no outside data to hide"
        for caller in scoped_callers(world, roles):
            r = world.call(caller, _copy(request))
            assert r.status_code == 200, (caller, r.text)
            leaked = [m for m in OUTSIDE_MARKERS if m in r.text]
            assert not leaked, (caller, leaked, r.text[:500])
            if shows_inside is not None:  # every scoped caller: a street's or district's too
                assert shows_inside in r.text, (caller, r.text[:500])

    return check


def outside_filter_is_refused(request: Request, *, endless: bool = False) -> ScopeCheck:
    """Asking a listing for the outside community: 403 for a scope of communities (it names what it
    reaches), at most an empty answer for the others (not asked of an `endless` stream)."""

    def check(world: World, roles: frozenset[str]) -> None:
        for caller in scoped_callers(world, roles):
            if endless:  # its answer only
                expected = {403} if CALLERS[caller][1].communities_only else {200, 403}
                assert world.status_only(caller, _copy(request)) in expected, caller
                continue
            if CALLERS[caller][1].communities_only:
                r = world.call(caller, _copy(request))
                assert r.status_code == 403, (caller, r.text)
            else:
                r = world.call(caller, _copy(request))
                assert r.status_code in (200, 403), (caller, r.text)
                if r.status_code == 200:
                    assert not any(m in r.text for m in OUTSIDE_MARKERS), (caller, r.text)

    return check


def writing_outside_is_refused(*requests: Request) -> ScopeCheck:
    """Putting something in the outside place (a new device, a move, a new place): 403."""

    def check(world: World, roles: frozenset[str]) -> None:
        for caller in scoped_callers(world, roles):
            for request in requests:
                r = world.call(caller, _copy(request))
                assert r.status_code == 403, (caller, request, r.text)
                assert "outside" in r.json()["detail"]

    return check


def unscoped_only(request: Request) -> ScopeCheck:
    """What spans every community: 403 for a scoped caller, allowed for an unscoped one."""

    def check(world: World, roles: frozenset[str]) -> None:
        for caller in scoped_callers(world, roles):
            r = world.call(caller, _copy(request))
            assert r.status_code == 403 and "spans every community" in r.json()["detail"], (caller, r.text)
        for caller in unscoped_callers(roles):
            r = world.call(caller, _copy(request))
            assert r.status_code not in (401, 403), (caller, r.text)

    return check


def all_of(*checks: ScopeCheck) -> ScopeCheck:
    def check(world: World, roles: frozenset[str]) -> None:
        for c in checks:
            c(world, roles)

    return check


def no_place(reason: str) -> ScopeCheck:
    """A route whose objects are in no place: the scope does not apply (`reason` says why)."""
    assert reason

    def check(world: World, roles: frozenset[str]) -> None:
        return None

    return check


def _copy(request: Request) -> Request:
    method, url, kwargs = request
    return method, url, dict(kwargs)


def _same_words(detail: str, missing_detail: str, outside: Request, missing: Request) -> bool:
    out_id = _object_id(outside[1])
    missing_id = _object_id(missing[1])
    return detail.replace(out_id, "<id>") == missing_detail.replace(missing_id, "<id>")


def _object_id(url: str) -> str:
    path, _, query = url.partition("?")
    if "device_id=" in query:
        return query.split("device_id=")[1].split("&")[0]
    parts = path.split("/")
    # /api/v1/<collection>/<id>[/<action>...]
    return parts[4]


# ---------------------------------------------------------------------------------------------
# The table: every route, who may use it, a harmless probe, and how the scope applies


@dataclass(frozen=True)
class RouteSpec:
    roles: frozenset[str]
    probe: Request
    scope: ScopeCheck
    public: bool = False


def R(method: str, url: str, **kwargs: Any) -> Request:
    return method, url, kwargs


ALL: Final = frozenset(API_ROLES)
INSTALLERS: Final = frozenset({"admin", "installer"})
READERS: Final = frozenset({"admin", "manager", "viewer"})
MANAGERS: Final = frozenset({"admin", "manager"})
PEOPLE: Final = frozenset({"admin", "installer", "manager", "viewer"})
ADMIN: Final = frozenset({"admin"})
DEV: Final = "/api/v1/devices"


def _device_action(action: str, **kwargs: Any) -> RouteSpec:
    return RouteSpec(
        INSTALLERS,
        R("POST", f"{DEV}/nope/{action}", **kwargs),
        outside_is_not_found(
            R("POST", f"{DEV}/out-1/{action}", **kwargs), R("POST", f"{DEV}/nope/{action}", **kwargs)
        ),
    )


def _import_check(world: World, roles: frozenset[str]) -> None:
    """Rows for the outside place, or for a device id taken outside, are error rows; nothing changes."""
    body = (
        "device_id,device_type,community,grid_code\n"
        f"new-out,manhole_cover,{OUTSIDE['community']},{CODES['out']}001\n"
        f"out-1,manhole_cover,{INSIDE['community']},{CODES['in']}001\n"
    )
    for caller in scoped_callers(world, roles):
        r = world.call(
            caller,
            R(
                "POST",
                f"{DEV}/import?issue_credentials=false",
                content=body.encode(),
                headers={"Content-Type": "text/csv"},
            ),
        )
        assert r.status_code == 200, r.text
        rows = r.json()["rows"]
        assert [x["outcome"] for x in rows] == ["error", "error"], rows
        assert "is outside" in rows[0]["error"] and "taken by a device outside" in rows[1]["error"]
    assert Registry(world.engine).get("new-out") is None
    out = Registry(world.engine).get("out-1")
    assert out is not None and out.community == OUTSIDE["community"]


def _deadletters_check(world: World, roles: frozenset[str]) -> None:
    for caller in scoped_callers(world, roles):
        r = world.call(caller, R("GET", "/api/v1/deadletters"))
        assert r.status_code == 403 and "give device_id" in r.json()["detail"]
        r = world.call(caller, R("GET", "/api/v1/deadletters?device_id=in-1"))
        assert r.status_code == 200 and {d["device_id"] for d in r.json()} == {"in-1"}


def _place_check(world: World, roles: frozenset[str]) -> None:
    """A community's manager does not reach the district above it either."""
    for caller in scoped_callers(world, roles):
        assert world.call(caller, R("GET", f"/api/v1/places/{CODES['in'][:6]}")).status_code == 404


def _me_check(world: World, roles: frozenset[str]) -> None:
    """Not a place: the caller's own identity, with its own scope."""
    for caller in scoped_callers(world, roles):
        body = world.call(caller, R("GET", "/api/v1/me")).json()
        assert Scope.model_validate(body["scope"]) == CALLERS[caller][1]


NEW_DEVICE_OUT: Final = {
    "device_id": "new-out",
    "device_type": "manhole_cover",
    **OUTSIDE,
    "grid_code": CODES["out"] + "001",
}
MOVE_OUT: Final = {"community": OUTSIDE["community"], "grid_code": CODES["out"] + "001"}

ROUTES: Final[dict[tuple[str, str], RouteSpec]] = {
    # -- installers' devices
    ("POST", DEV): RouteSpec(
        INSTALLERS,
        R("POST", DEV, json={}),
        writing_outside_is_refused(R("POST", f"{DEV}?issue_credentials=false", json=NEW_DEVICE_OUT)),
    ),
    ("GET", DEV): RouteSpec(
        INSTALLERS, R("GET", DEV), listing_stays_inside(R("GET", DEV), shows_inside="in-1")
    ),
    ("GET", f"{DEV}/export"): RouteSpec(
        INSTALLERS,
        R("GET", f"{DEV}/export"),
        all_of(
            listing_stays_inside(R("GET", f"{DEV}/export"), shows_inside="in-1"),
            listing_stays_inside(R("GET", f"{DEV}/export?format=json"), shows_inside="in-1"),
        ),
    ),
    ("POST", f"{DEV}/import"): RouteSpec(
        INSTALLERS,
        R(
            "POST",
            f"{DEV}/import",
            content=b"device_id,device_type,community,grid_code\n",
            headers={"Content-Type": "text/csv"},
        ),
        _import_check,
    ),
    ("GET", f"{DEV}/{{device_id}}"): RouteSpec(
        INSTALLERS,
        R("GET", f"{DEV}/nope"),
        outside_is_not_found(
            R("GET", f"{DEV}/out-1"), R("GET", f"{DEV}/nope"), inside=R("GET", f"{DEV}/in-1")
        ),
    ),
    ("PATCH", f"{DEV}/{{device_id}}"): RouteSpec(
        INSTALLERS,
        R("PATCH", f"{DEV}/nope", json={}),
        all_of(
            outside_is_not_found(
                R("PATCH", f"{DEV}/out-1", json={"building": "9"}),
                R("PATCH", f"{DEV}/nope", json={"building": "9"}),
            ),
            writing_outside_is_refused(R("PATCH", f"{DEV}/in-1", json={"community": OUTSIDE["community"]})),
        ),
    ),
    ("POST", f"{DEV}/{{device_id}}/move"): RouteSpec(
        INSTALLERS,
        R("POST", f"{DEV}/nope/move", json=MOVE_OUT),
        all_of(
            outside_is_not_found(
                R("POST", f"{DEV}/out-1/move", json=MOVE_OUT), R("POST", f"{DEV}/nope/move", json=MOVE_OUT)
            ),
            writing_outside_is_refused(R("POST", f"{DEV}/in-1/move", json=MOVE_OUT)),
        ),
    ),
    ("POST", f"{DEV}/{{device_id}}/disable"): _device_action("disable"),
    ("POST", f"{DEV}/{{device_id}}/enable"): _device_action("enable"),
    ("POST", f"{DEV}/{{device_id}}/retire"): _device_action("retire"),
    ("POST", f"{DEV}/{{device_id}}/confirm"): _device_action("confirm"),
    ("POST", f"{DEV}/{{device_id}}/credentials/rotate"): _device_action("credentials/rotate"),
    ("GET", f"{DEV}/{{device_id}}/history"): RouteSpec(
        INSTALLERS,
        R("GET", f"{DEV}/nope/history"),
        outside_is_not_found(
            R("GET", f"{DEV}/out-1/history"),
            R("GET", f"{DEV}/nope/history"),
            inside=R("GET", f"{DEV}/in-1/history"),
        ),
    ),
    # -- commissioning and dead letters
    ("GET", "/api/v1/commissioning"): RouteSpec(
        INSTALLERS,
        R("GET", "/api/v1/commissioning"),
        listing_stays_inside(R("GET", "/api/v1/commissioning"), shows_inside="in-1"),
    ),
    ("GET", "/api/v1/unknown-devices"): RouteSpec(
        INSTALLERS, R("GET", "/api/v1/unknown-devices"), unscoped_only(R("GET", "/api/v1/unknown-devices"))
    ),
    ("GET", "/api/v1/deadletters"): RouteSpec(
        INSTALLERS,
        R("GET", "/api/v1/deadletters"),
        all_of(
            outside_is_not_found(
                R("GET", "/api/v1/deadletters?device_id=out-1"),
                R("GET", "/api/v1/deadletters?device_id=nope"),
            ),
            _deadletters_check,
        ),
    ),
    ("GET", "/api/v1/deadletters/counts"): RouteSpec(
        INSTALLERS,
        R("GET", "/api/v1/deadletters/counts"),
        unscoped_only(R("GET", "/api/v1/deadletters/counts")),
    ),
    # -- places and responsible units
    ("POST", "/api/v1/places"): RouteSpec(
        INSTALLERS,
        R("POST", "/api/v1/places", json={}),
        writing_outside_is_refused(
            R("POST", "/api/v1/places", json={"code": CODES["out"] + "002", "name": "新网格"})
        ),
    ),
    ("GET", "/api/v1/places"): RouteSpec(
        INSTALLERS,
        R("GET", "/api/v1/places"),
        all_of(
            listing_stays_inside(R("GET", "/api/v1/places"), shows_inside=INSIDE["community"]),
            listing_stays_inside(R("GET", "/api/v1/places?level=grid")),
        ),
    ),
    ("GET", "/api/v1/places/{code}"): RouteSpec(
        INSTALLERS,
        R("GET", "/api/v1/places/999999"),
        all_of(
            outside_is_not_found(
                R("GET", f"/api/v1/places/{CODES['out']}"),
                R("GET", "/api/v1/places/999999999999"),
                inside=R("GET", f"/api/v1/places/{CODES['in']}001"),
            ),
            _place_check,
        ),
    ),
    ("POST", "/api/v1/responsible-units"): RouteSpec(
        INSTALLERS,
        R("POST", "/api/v1/responsible-units", json={}),
        unscoped_only(R("POST", "/api/v1/responsible-units", json={"unit_id": "x", "name": "x"})),
    ),
    ("GET", "/api/v1/responsible-units"): RouteSpec(
        INSTALLERS,
        R("GET", "/api/v1/responsible-units"),
        no_place("responsible units serve every community: shared reference data, read by every installer"),
    ),
    ("GET", "/api/v1/responsible-units/{unit_id}"): RouteSpec(
        INSTALLERS,
        R("GET", "/api/v1/responsible-units/nope"),
        no_place("responsible units serve every community: shared reference data, read by every installer"),
    ),
    # -- incidents (api/incidents.py)
    ("POST", "/api/v1/incidents/{incident_id}/reports"): RouteSpec(
        frozenset({"admin", "incident_system"}),
        R("POST", f"/api/v1/incidents/{NO_INCIDENT}/reports", json={"status": "dispatched"}),
        lambda w, roles: outside_is_not_found(
            R("POST", f"/api/v1/incidents/{w.incident_out}/reports", json={"status": "dispatched"}),
            R("POST", f"/api/v1/incidents/{NO_INCIDENT}/reports", json={"status": "dispatched"}),
        )(w, roles),
    ),
    ("GET", "/api/v1/incidents"): RouteSpec(
        READERS,
        R("GET", "/api/v1/incidents"),
        all_of(
            listing_stays_inside(R("GET", "/api/v1/incidents?status=all"), shows_inside="in-1"),
            outside_filter_is_refused(R("GET", f"/api/v1/incidents?community={OUTSIDE['community']}")),
        ),
    ),
    ("GET", "/api/v1/incidents/{incident_id}"): RouteSpec(
        READERS,
        R("GET", f"/api/v1/incidents/{NO_INCIDENT}"),
        lambda w, roles: outside_is_not_found(
            R("GET", f"/api/v1/incidents/{w.incident_out}"),
            R("GET", f"/api/v1/incidents/{NO_INCIDENT}"),
            inside=R("GET", f"/api/v1/incidents/{w.incident_in}"),
        )(w, roles),
    ),
    ("POST", "/api/v1/incidents/{incident_id}/ack"): RouteSpec(
        MANAGERS,
        R("POST", f"/api/v1/incidents/{NO_INCIDENT}/ack"),
        lambda w, roles: outside_is_not_found(
            R("POST", f"/api/v1/incidents/{w.incident_out}/ack"),
            R("POST", f"/api/v1/incidents/{NO_INCIDENT}/ack"),
        )(w, roles),
    ),
    ("GET", "/api/v1/false-alarms"): RouteSpec(
        INSTALLERS, R("GET", "/api/v1/false-alarms"), unscoped_only(R("GET", "/api/v1/false-alarms"))
    ),
    # -- managers (api/manager.py)
    ("POST", "/api/v1/incidents/{incident_id}/comments"): RouteSpec(
        MANAGERS,
        R("POST", f"/api/v1/incidents/{NO_INCIDENT}/comments", json={"text": "x"}),
        lambda w, roles: outside_is_not_found(
            R("POST", f"/api/v1/incidents/{w.incident_out}/comments", json={"text": "x"}),
            R("POST", f"/api/v1/incidents/{NO_INCIDENT}/comments", json={"text": "x"}),
        )(w, roles),
    ),
    ("POST", "/api/v1/incidents/{incident_id}/assign"): RouteSpec(
        MANAGERS,
        R("POST", f"/api/v1/incidents/{NO_INCIDENT}/assign", json={"assignee": "x"}),
        lambda w, roles: outside_is_not_found(
            R("POST", f"/api/v1/incidents/{w.incident_out}/assign", json={"assignee": "x"}),
            R("POST", f"/api/v1/incidents/{NO_INCIDENT}/assign", json={"assignee": "x"}),
        )(w, roles),
    ),
    # An endless stream: probed with a bad Last-Event-ID (422 before streaming); its scope by the filter.
    ("GET", "/api/v1/incidents/stream"): RouteSpec(
        READERS,
        R("GET", "/api/v1/incidents/stream", headers={"Last-Event-ID": "x"}),
        outside_filter_is_refused(
            R("GET", f"/api/v1/incidents/stream?community={OUTSIDE['community']}"), endless=True
        ),
    ),
    ("GET", "/api/v1/device-status"): RouteSpec(
        READERS,
        R("GET", "/api/v1/device-status"),
        all_of(
            listing_stays_inside(R("GET", "/api/v1/device-status"), shows_inside="in-1"),
            outside_filter_is_refused(R("GET", f"/api/v1/device-status?community={OUTSIDE['community']}")),
        ),
    ),
    ("GET", "/api/v1/device-status/{device_id}"): RouteSpec(
        READERS,
        R("GET", "/api/v1/device-status/nope"),
        outside_is_not_found(R("GET", "/api/v1/device-status/out-1"), R("GET", "/api/v1/device-status/nope")),
    ),
    ("GET", f"{DEV}/{{device_id}}/readings"): RouteSpec(
        READERS,
        R("GET", f"{DEV}/nope/readings"),
        outside_is_not_found(R("GET", f"{DEV}/out-1/readings"), R("GET", f"{DEV}/nope/readings")),
    ),
    ("GET", "/api/v1/overview"): RouteSpec(
        READERS,
        R("GET", "/api/v1/overview"),
        all_of(
            listing_stays_inside(R("GET", "/api/v1/overview"), shows_inside=INSIDE["community"]),
            outside_filter_is_refused(R("GET", f"/api/v1/overview?community={OUTSIDE['community']}")),
        ),
    ),
    # -- people (api/users.py)
    ("POST", "/api/v1/auth/login"): RouteSpec(
        ALL,
        R("POST", "/api/v1/auth/login", json={"username": "nobody", "password": "x"}),
        no_place("logging in: no credential yet"),
        public=True,
    ),
    ("POST", "/api/v1/auth/logout"): RouteSpec(
        PEOPLE, R("POST", "/api/v1/auth/logout"), no_place("ends the caller's own session")
    ),
    ("GET", "/api/v1/me"): RouteSpec(PEOPLE, R("GET", "/api/v1/me"), _me_check),
    ("POST", "/api/v1/users"): RouteSpec(
        ADMIN, R("POST", "/api/v1/users", json={}), no_place("users are people, in no place; admins only")
    ),
    ("GET", "/api/v1/users"): RouteSpec(
        ADMIN, R("GET", "/api/v1/users"), no_place("users are people, in no place; admins only")
    ),
    ("GET", "/api/v1/users/{username}"): RouteSpec(
        ADMIN, R("GET", "/api/v1/users/nobody"), no_place("users are people, in no place; admins only")
    ),
    ("PATCH", "/api/v1/users/{username}"): RouteSpec(
        ADMIN,
        R("PATCH", "/api/v1/users/nobody", json={}),
        no_place("users are people, in no place; admins only"),
    ),
    ("GET", "/healthz"): RouteSpec(ALL, R("GET", "/healthz"), no_place("liveness"), public=True),
    # -- the managers' web page (api/webpage.py): static files, no data; the page calls the routes above
    ("GET", "/"): RouteSpec(ALL, R("GET", "/"), no_place("the web page: static, no data"), public=True),
    ("GET", "/app/{path:path}"): RouteSpec(
        ALL, R("GET", "/app/app.js"), no_place("the web page's files and views: static, no data"), public=True
    ),
}

#: The incident system's one route.
BACK_CHANNEL: Final = ("POST", "/api/v1/incidents/{incident_id}/reports")


def app_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every route the app answers, the included routers' too."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI before included routers were kept apart
        contexts: Any = app.routes
    else:
        contexts = iter_route_contexts(app.routes)
    found = set()
    for route in contexts:
        path = route.path
        if path in (app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url):
            continue
        for method in route.methods or ():
            if method != "HEAD":
                found.add((method, path))
    return found


# ---------------------------------------------------------------------------------------------
# The tests


def test_every_route_has_an_entry(world: World) -> None:
    app = world.client.app
    assert isinstance(app, FastAPI)
    routes = app_routes(app)
    missing = sorted(routes - ROUTES.keys())
    assert not missing, f"routes without an entry in ROUTES (roles and scope): {missing}"
    assert sorted(ROUTES.keys() - routes) == [], "entries for routes that are gone"
    documented = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    assert documented <= routes


def test_the_incident_system_reaches_only_its_back_channel() -> None:
    reach = {route for route, spec in ROUTES.items() if "incident_system" in spec.roles and not spec.public}
    assert reach == {BACK_CHANNEL}


def test_viewers_are_read_only() -> None:
    own_session = {("POST", "/api/v1/auth/login"), ("POST", "/api/v1/auth/logout")}
    writes = [
        r for r, spec in ROUTES.items() if r[0] != "GET" and "viewer" in spec.roles and r not in own_session
    ]
    assert writes == []


ROUTE_IDS: Final = [f"{m} {p}" for m, p in ROUTES]


@pytest.mark.parametrize("route", list(ROUTES), ids=ROUTE_IDS)
def test_roles_not_allowed_are_403(world: World, route: tuple[str, str]) -> None:
    spec = ROUTES[route]
    if spec.public:
        r = world.call(None, _copy(spec.probe))
        assert r.status_code != 403 and "missing credentials" not in r.text
        return
    assert world.call(None, _copy(spec.probe)).status_code == 401
    for role in sorted(set(API_ROLES) - spec.roles):
        r = world.call(role, _copy(spec.probe))
        assert r.status_code == 403, (role, r.status_code, r.text)
        assert f"has the role {role}; this needs one of" in r.json()["detail"]


@pytest.mark.parametrize("route", list(ROUTES), ids=ROUTE_IDS)
def test_roles_allowed_get_past_the_role_check(world: World, route: tuple[str, str]) -> None:
    spec = ROUTES[route]
    for role in sorted(spec.roles):
        r = world.call(role, _copy(spec.probe))
        assert r.status_code not in (401, 403) or spec.public, (role, r.status_code, r.text)


@pytest.mark.parametrize("route", list(ROUTES), ids=ROUTE_IDS)
def test_scope(world: World, route: tuple[str, str]) -> None:
    spec = ROUTES[route]
    spec.scope(world, spec.roles)


def test_a_street_or_district_viewer_sees_the_incidents_of_their_place(world: World) -> None:
    for caller in ("viewer@street", "viewer@district"):
        listed = world.call(caller, R("GET", "/api/v1/incidents?status=all")).json()
        assert [i["incident_id"] for i in listed["incidents"]] == [world.incident_in], caller
        assert listed["total"] == 1
        inside = world.call(caller, R("GET", f"/api/v1/incidents?community={INSIDE['community']}")).json()
        assert inside["total"] == 1


def test_a_street_or_district_viewer_sees_the_devices_and_counts_of_their_place(world: World) -> None:
    for caller in ("viewer@street", "viewer@district"):
        for query in ("", f"?community={INSIDE['community']}"):
            status = world.call(caller, R("GET", f"/api/v1/device-status{query}")).json()
            assert [d["device_id"] for d in status["items"]] == ["in-1"], (caller, query)
            assert status["total"] == 1
            counts = world.call(caller, R("GET", f"/api/v1/overview{query}")).json()
            assert [r["key"] for r in counts["rows"]] == [{"community": INSIDE["community"]}], caller
            assert counts["totals"]["incidents"]["open"] == 1, (caller, counts)
            assert counts["totals"]["devices"]["total"] == 1, (caller, counts)
        # the live stream takes the community filter of a place inside the street (not a 403)
        stream = R("GET", f"/api/v1/incidents/stream?community={INSIDE['community']}")
        assert world.status_only(caller, stream) == 200, caller


def test_nothing_outside_changed(world: World) -> None:
    """The refused writes of the other tests left the outside device and incident as they were."""
    out = Registry(world.engine).describe("out-1")
    assert out is not None and out.lifecycle == "in_service" and out.building is None
    assert out.community == OUTSIDE["community"]
    incident = IncidentStore(world.engine, []).get(world.incident_out)
    assert incident is not None and incident.acknowledged_at is None and incident.status == "open"
    assert Places(world.engine).get(CODES["out"] + "002") is None
