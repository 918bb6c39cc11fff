"""The installers' device routes: register (with MQTT credentials), read, change, move, cut off, retire,
confirm, rotate credentials, bulk import and export. Installer or admin keys only."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal, Protocol

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.auth import Installer, Principal
from api.errors import ERROR_RESPONSES, BodyValidationError
from api.schemas import (
    ChangeOut,
    CredentialsOut,
    DeviceCreated,
    DeviceDetail,
    DeviceEventOut,
    DeviceIn,
    DeviceOut,
    DevicePage,
    DevicePatch,
    DeviceStateOut,
    ErrorOut,
    ImportOut,
    ImportRowOut,
    Lifecycle,
    MoveIn,
    RotatedOut,
)
from api.services import Services, services
from devices import THING_MODELS
from gateway.installers import ImportResult
from gateway.registry import (
    ATTRIBUTE_PREFIX,
    EXPORT_COLUMNS,
    Change,
    DeviceNotFoundError,
    DeviceRecord,
    ParsedCsv,
    RegisteredDevice,
    RowResult,
    export_row,
    parse_csv,
    parse_json_records,
)

router = APIRouter(prefix="/api/v1", tags=["devices"], responses=ERROR_RESPONSES)
Svc = Annotated[Services, Depends(services)]

Responses = dict[int | str, dict[str, Any]]
_404: Responses = {404: {"model": ErrorOut, "description": "the device is not registered"}}
_409: Responses = {
    409: {"model": ErrorOut, "description": "the device's state does not allow it (retired, ...)"}
}
_BROKER: Responses = {
    502: {"model": ErrorOut, "description": "the broker refused the command"},
    503: {"model": ErrorOut, "description": "the broker cannot issue or change credentials now"},
}


def check_scope(
    principal: Principal,
    community: str | None,
    what: str,
    *,
    district: str | None = None,
    street: str | None = None,
) -> None:
    """403 unless the caller's scope reaches the place a device is put in (a write to another place)."""
    if not principal.scope.allows(district=district, street=street, community=community):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"{what} is in community {community!r}, outside {principal.whose} scope "
            f"({principal.scope.describe()})",
        )


def _device(svc: Services, principal: Principal, device_id: str) -> RegisteredDevice:
    """The device, or 404 when it is not registered or outside the caller's scope (the same answer)."""
    device = svc.registry.describe(device_id)
    if device is None or not principal.scope.allows(
        district=device.district, street=device.street, community=device.community
    ):
        raise DeviceNotFoundError(f"device {device_id!r} is not registered")
    return device


@contextlib.contextmanager
def _invalid_body() -> Iterator[None]:
    """A pydantic ValidationError inside is the 422 naming each bad field."""
    try:
        yield
    except ValidationError as exc:
        raise BodyValidationError(exc) from None


def _record(svc: Services, data: Mapping[str, Any]) -> DeviceRecord:
    with _invalid_body():
        return svc.registry.validate(data)


class _Operation(Protocol):
    def __call__(self, device_id: str, *, actor: str) -> Change: ...


def _lifecycle_change(
    svc: Services, principal: Principal, device_id: str, operation: _Operation
) -> ChangeOut:
    """`operation` (disable, enable, retire, confirm) on a device the key may reach."""
    _device(svc, principal, device_id)
    return ChangeOut.of(operation(device_id, actor=principal.actor))


@router.post(
    "/devices",
    status_code=status.HTTP_201_CREATED,
    summary="Register a device and issue its MQTT credentials (shown once)",
    responses={409: {"model": ErrorOut, "description": "the device id is registered already"}, **_BROKER},
)
def create_device(
    body: DeviceIn,
    principal: Installer,
    svc: Svc,
    issue_credentials: Annotated[
        bool, Query(description="false: registry only (a device reached through an adaptor)")
    ] = True,
) -> DeviceCreated:
    """The device is registered (lifecycle `registered`) and gets its own broker account: username and
    client id = device id, a random password returned here once, rights to publish only on its own
    `sc/v1/{type}/{id}/...` topics. If the broker cannot issue credentials the answer is 503 and
    nothing is registered."""
    record = _record(svc, body.model_dump())
    check_scope(
        principal,
        record.community,
        f"device {record.device_id!r}",
        district=record.district,
        street=record.street,
    )
    device, credentials = svc.installers.register(
        record, actor=principal.actor, issue_credentials=issue_credentials
    )
    return DeviceCreated(
        device=DeviceOut.of(device),
        credentials=None if credentials is None else CredentialsOut.of(credentials),
    )


@router.get("/devices", summary="List devices, filtered and paged")
def list_devices(
    principal: Installer,
    svc: Svc,
    device_type: Annotated[str | None, Query(alias="type", description="device type")] = None,
    community: str | None = None,
    grid_code: str | None = None,
    lifecycle: Lifecycle | None = None,
    batch: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> DevicePage:
    filters: dict[str, Any] = {
        "device_type": device_type,
        "community": community,
        "grid_code": grid_code,
        "lifecycle": lifecycle,
        "batch": batch,
        "communities": principal.scope.communities,
    }
    items = svc.registry.list(**filters, limit=limit, offset=offset)
    return DevicePage(
        items=[DeviceOut.of(d) for d in items],
        total=svc.registry.count(**filters),
        limit=limit,
        offset=offset,
    )


@router.get(
    "/devices/export",
    summary="Export every device, as CSV in the import format or as JSON",
    response_class=Response,
    responses={
        200: {
            "description": "CSV (importable again) or a JSON array of devices",
            "content": {"text/csv": {}, "application/json": {}},
        }
    },
)
def export_devices(
    principal: Installer,
    svc: Svc,
    fmt: Annotated[Literal["csv", "json"], Query(alias="format")] = "csv",
) -> Response:
    """Importing the export again (CSV, or JSON: its read-only fields are ignored) changes nothing."""
    communities = principal.scope.communities
    registry = svc.registry
    if fmt == "json":

        def json_chunks() -> Iterator[str]:
            yield "["
            for i, device in enumerate(registry.iter_devices(communities=communities)):
                yield ("," if i else "") + json.dumps(
                    jsonable_encoder(DeviceOut.of(device)), ensure_ascii=False
                )
            yield "]\n"

        return StreamingResponse(
            json_chunks(),
            media_type="application/json",
            headers={"Content-Disposition": 'attachment; filename="devices.json"'},
        )
    attributes = registry.attribute_names(communities=communities)

    def csv_chunks() -> Iterator[str]:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([*EXPORT_COLUMNS, *(ATTRIBUTE_PREFIX + a for a in attributes)])
        for i, device in enumerate(registry.iter_devices(communities=communities), start=1):
            writer.writerow(export_row(device, attributes))
            if i % 1000 == 0:
                yield buf.getvalue()
                buf.seek(0)
                buf.truncate()
        yield buf.getvalue()

    return StreamingResponse(
        csv_chunks(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="devices.csv"'},
    )


_IMPORT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "text/csv": {
                "schema": {"type": "string"},
                "example": "device_id,device_type,community,grid_code,building,attr.bay_kind\n"
                "pk-1,parking_sensor,东华门社区,110101001001001,B1,fire_lane\n",
            },
            "application/json": {
                "schema": {"type": "array", "items": {"$ref": "#/components/schemas/DeviceIn"}}
            },
        },
    }
}


@router.post(
    "/devices/import",
    summary="Register or update many devices from CSV or JSON, with a per-row report",
    response_model=ImportOut,
    openapi_extra=_IMPORT_BODY,
    responses={
        413: {"model": ErrorOut, "description": "the body is larger than SC_API_MAX_IMPORT_BYTES"},
        415: {"model": ErrorOut, "description": "neither text/csv nor application/json"},
        503: {
            "description": "the broker cannot issue credentials now; nothing was created ({detail, report})"
        },
    },
)
async def import_devices(
    request: Request,
    principal: Installer,
    svc: Svc,
    dry_run: Annotated[bool, Query(description="report what would happen, change nothing")] = False,
    issue_credentials: Annotated[bool, Query(description="issue credentials to the devices created")] = True,
) -> ImportOut | Response:
    """CSV (text/csv, the format of `sc-gateway devices import`, UTF-8) or JSON (application/json: an
    array of devices as POST /devices takes them). Each row is created, updated, unchanged or an error
    with its reason; the valid rows are imported even when others fail; importing the same rows again
    changes nothing. Created devices get MQTT credentials, returned here once, row by row."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("text/csv", "application/csv", "application/json"):
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            detail="send the devices as text/csv or application/json "
            f"(got {content_type or 'no content type'!r})",
        )
    body = await request.body()
    if len(body) > svc.settings.api_max_import_bytes:
        raise HTTPException(
            413,
            detail=f"the import is {len(body)} bytes, "
            f"more than {svc.settings.api_max_import_bytes}: split it",
        )
    parsed = _parse_import(svc, content_type, body)
    parsed = _within_scope(svc, principal, parsed)
    result: ImportResult = await run_in_threadpool(
        svc.installers.import_records,
        parsed,
        actor=principal.actor,
        dry_run=dry_run,
        issue_credentials=issue_credentials,
        batch_size=svc.settings.import_batch_size,
    )
    report = result.report
    out = ImportOut(
        dry_run=report.dry_run,
        version=report.version,
        counts=report.counts,
        aborted=report.aborted,
        rows=[
            ImportRowOut(
                row=r.row,
                device_id=r.device_id,
                outcome=r.outcome,
                error=r.error,
                credentials=CredentialsOut.of(result.credentials[r.device_id])
                if r.device_id is not None and r.device_id in result.credentials
                else None,
            )
            for r in report.rows
        ],
    )
    if report.aborted is not None and not result.credentials and report.counts["created"] == 0:
        return JSONResponse(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            content={"detail": report.aborted, "report": jsonable_encoder(out)},
            headers={"Retry-After": "10"},
        )
    return out


def _parse_import(svc: Services, content_type: str, body: bytes) -> ParsedCsv:
    scheme = svc.registry.code_scheme
    if content_type == "application/json":
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise HTTPException(422, detail=f"the body is not valid JSON: {exc}") from None
        if isinstance(doc, dict) and set(doc) == {"devices"}:
            doc = doc["devices"]
        return parse_json_records(doc, scheme=scheme)
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise HTTPException(
            422, detail=f"the CSV is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as CSV UTF-8"
        ) from None
    return parse_csv(io.StringIO(text, newline=""), scheme=scheme)


def _within_scope(svc: Services, principal: Principal, parsed: ParsedCsv) -> ParsedCsv:
    """Rows that would put a device outside the caller's scope, or change one outside it, are errors."""
    scope = principal.scope
    if scope.unrestricted:
        return parsed
    new = set(svc.registry.absent(record.device_id for _, record in parsed.records))
    records, errors = [], list(parsed.errors)
    for row, record in parsed.records:
        current = None if record.device_id in new else svc.registry.get(record.device_id)
        if not scope.allows(district=record.district, street=record.street, community=record.community):
            error = f"community {record.community!r} is outside {principal.whose} scope ({scope.describe()})"
        elif current is not None and not scope.allows(
            district=current.district, street=current.street, community=current.community
        ):
            error = f"device id {record.device_id!r} is taken by a device outside {principal.whose} scope"
        else:
            records.append((row, record))
            continue
        errors.append(RowResult(row, record.device_id, "error", error))
    return ParsedCsv(tuple(records), tuple(errors))


@router.get("/devices/{device_id}", summary="One device with what the gateway has seen of it", responses=_404)
def get_device(device_id: str, principal: Installer, svc: Svc) -> DeviceDetail:
    device = _device(svc, principal, device_id)
    state = svc.states.get(device_id)
    model = THING_MODELS.get(device.device_type)
    required = model.commissioning_fields if model is not None else ()
    return DeviceDetail(
        **DeviceOut.of(device).model_dump(),
        state=None if state is None else DeviceStateOut.of(state, required),
    )


@router.patch(
    "/devices/{device_id}",
    summary="Change a device's attributes, unit, firmware, codes ... (JSON merge patch)",
    responses={**_404, **_409},
)
def update_device(device_id: str, body: DevicePatch, principal: Installer, svc: Svc) -> ChangeOut:
    """Only the fields sent change; null clears a field; `attributes` merges key by key (null removes
    a key). Changing the type is 409: retire the device and register a new id."""
    device = _device(svc, principal, device_id)
    changes = body.model_dump(exclude_unset=True)
    if {"community", "street", "district"} & set(changes):
        place = {k: changes.get(k, getattr(device, k)) for k in ("community", "street", "district")}
        check_scope(
            principal, place["community"], "the new place", district=place["district"], street=place["street"]
        )
    with _invalid_body():
        change = svc.installers.update(device_id, changes, actor=principal.actor)
    return ChangeOut.of(change)


@router.post("/devices/{device_id}/move", summary="Put a device in another place", responses={**_404, **_409})
def move_device(device_id: str, body: MoveIn, principal: Installer, svc: Svc) -> ChangeOut:
    """The new community and grid code, and optionally district, street, building, address, lat, lon;
    place fields not given are cleared. The device's history keeps where it was."""
    _device(svc, principal, device_id)
    check_scope(principal, body.community, "the new place", district=body.district, street=body.street)
    with _invalid_body():
        change = svc.installers.move(device_id, body.model_dump(), actor=principal.actor)
    return ChangeOut.of(change)


@router.post(
    "/devices/{device_id}/disable",
    summary="Cut a device off: disconnected at once, its logins refused, its messages set aside",
    responses={**_404, **_409, **_BROKER},
)
def disable_device(device_id: str, principal: Installer, svc: Svc) -> ChangeOut:
    return _lifecycle_change(svc, principal, device_id, svc.installers.disable)


@router.post(
    "/devices/{device_id}/enable",
    summary="Re-enable a disabled device (back to in service, online or registered)",
    responses={**_404, **_409, **_BROKER},
)
def enable_device(device_id: str, principal: Installer, svc: Svc) -> ChangeOut:
    return _lifecycle_change(svc, principal, device_id, svc.installers.enable)


@router.post(
    "/devices/{device_id}/retire",
    summary="Retire a device for good: its broker account is deleted, its id never reused",
    responses={**_404, **_BROKER},
)
def retire_device(device_id: str, principal: Installer, svc: Svc) -> ChangeOut:
    return _lifecycle_change(svc, principal, device_id, svc.installers.retire)


@router.post(
    "/devices/{device_id}/confirm",
    summary="Confirm a device works where it is: in service",
    responses={**_404, **_409},
)
def confirm_device(device_id: str, principal: Installer, svc: Svc) -> ChangeOut:
    """For a device that cannot report all its commissioning fields yet, or that the installer has
    checked on site. Incidents from devices not in service are commissioning noise."""
    return _lifecycle_change(svc, principal, device_id, svc.installers.confirm)


@router.post(
    "/devices/{device_id}/credentials/rotate",
    summary="New MQTT password (shown once); the old one stops working at once",
    responses={**_404, **_409, **_BROKER},
)
def rotate_credentials(device_id: str, principal: Installer, svc: Svc) -> RotatedOut:
    """A connected device is disconnected. A device registered without credentials gets its first."""
    _device(svc, principal, device_id)
    device, credentials = svc.installers.rotate_credentials(device_id, actor=principal.actor)
    return RotatedOut(device=DeviceOut.of(device), credentials=CredentialsOut.of(credentials))


@router.get("/devices/{device_id}/history", summary="What happened to a device, newest first", responses=_404)
def device_history(
    device_id: str,
    principal: Installer,
    svc: Svc,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[DeviceEventOut]:
    _device(svc, principal, device_id)
    return [DeviceEventOut.of(e) for e in svc.registry.history(device_id, limit=limit)]
