"""Errors as answers: every one a JSON body `{"detail": "what is wrong"}` (422s also list each field).

| error | status |
|---|---|
| a field is invalid (request body, query, import row) | 422, `errors` per field |
| missing, malformed, unknown or revoked API key | 401 |
| the key's role or scope does not reach it | 403 |
| unknown device, place, unit | 404 |
| exists already; retired; the change conflicts with the device's state | 409 |
| import body of another content type | 415 |
| the broker refused the command | 502 |
| the broker cannot issue credentials now (down, not configured) | 503 |
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from gateway.installers import CredentialsRefusedError, CredentialsUnavailableError
from gateway.registry import (
    CsvFormatError,
    DeviceConflictError,
    DeviceExistsError,
    DeviceNotFoundError,
    DeviceRetiredError,
    PlaceExistsError,
    PlaceNotFoundError,
    PlaceParentError,
    UnitExistsError,
    UnitNotFoundError,
)

STATUS_OF: dict[type[Exception], int] = {
    DeviceNotFoundError: status.HTTP_404_NOT_FOUND,
    PlaceNotFoundError: status.HTTP_404_NOT_FOUND,
    UnitNotFoundError: status.HTTP_404_NOT_FOUND,
    DeviceExistsError: status.HTTP_409_CONFLICT,
    PlaceExistsError: status.HTTP_409_CONFLICT,
    UnitExistsError: status.HTTP_409_CONFLICT,
    DeviceRetiredError: status.HTTP_409_CONFLICT,
    DeviceConflictError: status.HTTP_409_CONFLICT,
    PlaceParentError: 422,
    CsvFormatError: 422,
    CredentialsRefusedError: status.HTTP_502_BAD_GATEWAY,
    CredentialsUnavailableError: status.HTTP_503_SERVICE_UNAVAILABLE,
}

#: The error answers of the OpenAPI document, by status.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing, malformed, unknown or revoked API key"},
    403: {"description": "the API key's role or scope does not allow it"},
    422: {"description": "invalid input: `errors` names each field and what is wrong"},
}


def _field_name(loc: Sequence[int | str]) -> str:
    return ".".join(str(p) for p in loc) or "request"


def field_errors(errors: Sequence[Any], prefix: Sequence[str] = ()) -> list[dict[str, Any]]:
    """pydantic's errors as [{field, message, input}] with readable messages."""
    out = []
    for err in errors:
        loc = (*prefix, *err.get("loc", ()))
        kind, msg = err.get("type"), str(err.get("msg", ""))
        if kind == "missing":
            msg = "is required"
        elif kind == "extra_forbidden":
            msg = "unknown field"
        msg = msg.removeprefix("Value error, ")
        value = err.get("input")
        item: dict[str, Any] = {"field": _field_name(loc), "message": msg}
        if kind not in ("missing", "extra_forbidden") and isinstance(value, str | int | float | bool):
            item["input"] = value
        out.append(item)
    return out


def unprocessable(errors: list[dict[str, Any]]) -> JSONResponse:
    detail = "invalid request: " + "; ".join(
        f"{e['field']}: {e['message']}" + (f" (got {e['input']!r})" if "input" in e else "") for e in errors
    )
    return JSONResponse(status_code=422, content={"detail": detail, "errors": errors})


class BodyValidationError(Exception):
    """A request body that passed the schema but not the registry's checks (codes, attributes)."""

    def __init__(self, exc: ValidationError, prefix: Sequence[str] = ("body",)) -> None:
        super().__init__(str(exc))
        self.errors = field_errors(exc.errors(include_url=False), prefix)


def install_error_handlers(app: FastAPI) -> None:
    async def on_request_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return unprocessable(field_errors(exc.errors()))

    async def on_body_validation(_request: Request, exc: BodyValidationError) -> JSONResponse:
        return unprocessable(exc.errors)

    async def on_known(_request: Request, exc: Exception) -> JSONResponse:
        code = next(c for t, c in STATUS_OF.items() if isinstance(exc, t))
        headers = {"Retry-After": "10"} if code == status.HTTP_503_SERVICE_UNAVAILABLE else None
        return JSONResponse(status_code=code, content={"detail": str(exc)}, headers=headers)

    app.add_exception_handler(RequestValidationError, on_request_validation)  # type: ignore[arg-type]
    app.add_exception_handler(BodyValidationError, on_body_validation)  # type: ignore[arg-type]
    for exc_type in STATUS_OF:
        app.add_exception_handler(exc_type, on_known)
