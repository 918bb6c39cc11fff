"""Places (district → street → community → grid) and responsible units: create, list, read."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, status

from api.auth import Installer
from api.errors import ERROR_RESPONSES
from api.schemas import ErrorOut, PlaceOut, UnitOut
from api.services import Services, services
from gateway.registry import PlaceNotFoundError, PlaceRecord, ResponsibleUnitRecord, UnitNotFoundError

router = APIRouter(prefix="/api/v1", responses=ERROR_RESPONSES)
Svc = Annotated[Services, Depends(services)]


@router.post(
    "/places",
    status_code=status.HTTP_201_CREATED,
    tags=["places"],
    summary="Register a place; its parent must be registered first",
    responses={409: {"model": ErrorOut, "description": "a place has that code already"}},
)
def create_place(body: PlaceRecord, principal: Installer, svc: Svc) -> PlaceOut:
    """The level follows from the code: district 6 digits, street 9 (district + 3), community 12
    (street + 3), grid 15 (community + 3) or a 14-digit legacy grid code. `level` and `parent_code`,
    when given, must agree with the code (422 if not); the parent must exist (422 if not)."""
    return PlaceOut.of(svc.places.add(body))


@router.get("/places", tags=["places"], summary="Places by code (parents before children)")
def list_places(
    principal: Installer,
    svc: Svc,
    level: Literal["district", "street", "community", "grid"] | None = None,
    parent_code: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[PlaceOut]:
    found = svc.places.list(level=level, parent_code=parent_code, limit=limit, offset=offset)
    return [PlaceOut.of(p) for p in found]


@router.get(
    "/places/{code}",
    tags=["places"],
    summary="One place",
    responses={404: {"model": ErrorOut, "description": "no place has that code"}},
)
def get_place(code: str, principal: Installer, svc: Svc) -> PlaceOut:
    place = svc.places.get(code)
    if place is None:
        raise PlaceNotFoundError(f"no place has the code {code!r}")
    return PlaceOut.of(place)


@router.post(
    "/responsible-units",
    status_code=status.HTTP_201_CREATED,
    tags=["responsible units"],
    summary="Register a responsible unit (权属/养护单位)",
    responses={409: {"model": ErrorOut, "description": "a unit has that id or name already"}},
)
def create_unit(body: ResponsibleUnitRecord, principal: Installer, svc: Svc) -> UnitOut:
    """Devices name their unit in `responsible_unit` (the unit's name)."""
    return UnitOut.of(svc.units.add(body))


@router.get("/responsible-units", tags=["responsible units"], summary="Responsible units by id")
def list_units(principal: Installer, svc: Svc, kind: str | None = None) -> list[UnitOut]:
    return [UnitOut.of(u) for u in svc.units.list(kind=kind)]


@router.get(
    "/responsible-units/{unit_id}",
    tags=["responsible units"],
    summary="One responsible unit",
    responses={404: {"model": ErrorOut, "description": "no unit has that id"}},
)
def get_unit(unit_id: str, principal: Installer, svc: Svc) -> UnitOut:
    unit = svc.units.get(unit_id)
    if unit is None:
        raise UnitNotFoundError(f"no responsible unit has the id {unit_id!r}")
    return UnitOut.of(unit)
