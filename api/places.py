"""Places (district → street → community → grid) and responsible units: create, list, read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Final, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, status

from api.auth import Installer, Principal, require_unscoped
from api.errors import ERROR_RESPONSES
from api.schemas import ErrorOut, PlaceOut, UnitOut
from api.services import Services, services
from gateway.registry import Place, PlaceNotFoundError, PlaceRecord, ResponsibleUnitRecord, UnitNotFoundError

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
    when given, must agree with the code (422 if not); the parent must exist (422 if not). A scoped
    caller adds places inside its scope only (403)."""
    if not _reaches(principal, str(body.code), str(body.level), body.name, _names_from(svc)):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"{body.level} {body.code} {body.name} is outside {principal.whose} scope "
            f"({principal.scope.describe()})",
        )
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
    if principal.scope.unrestricted:
        found = svc.places.list(level=level, parent_code=parent_code, limit=limit, offset=offset)
        return [PlaceOut.of(p) for p in found]
    # Scoped: the places inside it, paged here (a place hierarchy is thousands of rows, not millions).
    every = svc.places.list()
    by_code = {p.code: p.name for p in every}
    inside = [
        p
        for p in every
        if (level is None or p.level == level)
        and (parent_code is None or p.parent_code == parent_code)
        and _reaches(principal, p.code, p.level, p.name, by_code.get)
    ]
    return [PlaceOut.of(p) for p in inside[offset : offset + limit]]


@router.get(
    "/places/{code}",
    tags=["places"],
    summary="One place",
    responses={404: {"model": ErrorOut, "description": "no place has that code"}},
)
def get_place(code: str, principal: Installer, svc: Svc) -> PlaceOut:
    place = svc.places.get(code)
    if place is None or not _reaches(principal, place.code, place.level, place.name, _names_from(svc)):
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
    """Devices name their unit in `responsible_unit` (the unit's name). Units serve every community: for
    unscoped callers only."""
    require_unscoped(principal, "a responsible unit")
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


# -- scope ------------------------------------------------------------------------------------------------

# The code of a place's district, street and community: its first 6, 9, 12 digits (api/README.md "Codes").
_ANCESTOR_LENGTH: Final = {"district": 6, "street": 9, "community": 12}
_DEPTH: Final = {"district": 0, "street": 1, "community": 2, "grid": 3}


def _names_from(svc: Services) -> Callable[[str], str | None]:
    def name(code: str) -> str | None:
        place: Place | None = svc.places.get(code)
        return None if place is None else place.name

    return name


def _reaches(
    principal: Principal, code: str, level: str, name: str, name_of: Callable[[str], str | None]
) -> bool:
    """Whether a place is inside the caller's scope: it, or its street, district or community, is named
    in the scope (by name, as devices store places, or by code). A place above the scope (the district of
    a community manager) is outside it."""
    scope = principal.scope
    if scope.unrestricted:
        return True
    for ancestor, length in _ANCESTOR_LENGTH.items():
        if _DEPTH[ancestor] > _DEPTH.get(level, 3):
            continue
        ancestor_code = code[:length]
        ancestor_name = name if ancestor_code == code else name_of(ancestor_code)
        for value in (ancestor_code, ancestor_name):
            if value is not None and scope.allows(**{ancestor: value}):
                return True
    return False
