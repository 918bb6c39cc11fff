"""What the installer sees on site: commissioning of a site or batch, unknown devices, dead letters."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Final

from fastapi import APIRouter, Depends, HTTPException, Query

from api.auth import Installer, require_unscoped
from api.errors import ERROR_RESPONSES
from api.schemas import CommissioningOut, DeadLetterOut, DeviceProgressOut, UnknownDeviceOut
from api.services import Services, services
from gateway.registry import DeviceNotFoundError

router = APIRouter(prefix="/api/v1", tags=["commissioning"], responses=ERROR_RESPONSES)
Svc = Annotated[Services, Depends(services)]

_DURATION_RE: Final = re.compile(r"(\d+)\s*([smhdw])")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
SINCE_HELP: Final = "30m, 24h, 7d, 2w ago, or an ISO 8601 time (UTC if it names no offset)"


def parse_since(
    text: str | None, *, now: dt.datetime | None = None, name: str = "since"
) -> dt.datetime | None:
    """A `since` query parameter (or another of that form, `name`) as a time; 422 naming the parameter
    if it is neither form."""
    if text is None or not text.strip():
        return None
    m = _DURATION_RE.fullmatch(text.strip())
    if m:
        now = now or dt.datetime.now(dt.UTC)
        return now - dt.timedelta(seconds=int(m.group(1)) * _UNIT_S[m.group(2)])
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise HTTPException(
            422,
            detail=f"{name}: {text!r} is neither a duration (30m, 24h, 7d) nor an ISO 8601 time",
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


@router.get("/commissioning", summary="A site's or a batch's commissioning: who is talking, what they sent")
def commissioning(
    principal: Installer,
    svc: Svc,
    community: str | None = None,
    batch: str | None = None,
    grid_code: str | None = None,
    device_type: Annotated[str | None, Query(alias="type")] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> CommissioningOut:
    """Counts per lifecycle (registered → online → in service), how many were never heard from, and
    each device's last message and the commissioning fields it has not reported yet."""
    result = svc.registry.commissioning(
        community=community,
        batch=batch,
        grid_code=grid_code,
        device_type=device_type,
        communities=principal.scope.communities,
        limit=limit,
    )
    given = {"community": community, "batch": batch, "grid_code": grid_code, "type": device_type}
    return CommissioningOut(
        filter={k: v for k, v in given.items() if v is not None},
        total=result.total,
        counts=dict(result.counts),
        not_heard_from=result.not_heard_from,
        devices=[DeviceProgressOut.of(p) for p in result.devices],
    )


@router.get("/unknown-devices", summary="Unregistered device ids seen on the broker: the devices to register")
def unknown_devices(
    principal: Installer,
    svc: Svc,
    since: Annotated[str | None, Query(description=SINCE_HELP)] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> list[UnknownDeviceOut]:
    """From the dead letters: each id's topic, type, how many messages were set aside and the last one.
    Unregistered devices are in no community: for unscoped callers only."""
    require_unscoped(principal, "the list of unregistered devices")
    found = svc.deadletters.unknown_devices(since=parse_since(since), limit=limit)
    return [UnknownDeviceOut.of(u) for u in found]


@router.get("/deadletters", summary="The newest messages the gateway set aside, and why")
def dead_letters(
    principal: Installer,
    svc: Svc,
    reason: Annotated[str | None, Query(description="a reason code, e.g. out_of_range")] = None,
    device_id: str | None = None,
    since: Annotated[str | None, Query(description=SINCE_HELP)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> list[DeadLetterOut]:
    """A scoped caller sees the dead letters of one of its devices (`device_id`) only."""
    if not principal.scope.unrestricted:
        if device_id is None:
            require_unscoped(principal, "the dead letters of every device (give device_id)")
        else:
            device = svc.registry.get(device_id)
            if device is None or not principal.scope.allows(
                district=device.district, street=device.street, community=device.community
            ):
                raise DeviceNotFoundError(f"device {device_id!r} is not registered")
    letters = svc.deadletters.recent(
        limit=limit, reason=reason, device_id=device_id, since=parse_since(since)
    )
    return [DeadLetterOut.of(d) for d in letters]


@router.get("/deadletters/counts", summary="Dead letters per reason, most frequent first")
def dead_letter_counts(
    principal: Installer,
    svc: Svc,
    since: Annotated[str | None, Query(description=SINCE_HELP)] = None,
) -> dict[str, int]:
    require_unscoped(principal, "the dead-letter count")
    return svc.deadletters.count_by_reason(since=parse_since(since))
