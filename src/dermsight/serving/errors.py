"""How errors are answered: ``{"detail": "<one readable sentence>"}`` with the status the
error stands for (passed to FastAPI as its exception handlers)."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from dermsight.serving.limits import Overloaded
from dermsight.serving.scoring import InputError
from dermsight.serving.storage.models import NotFound


async def validation_error(_request: Request, err: RequestValidationError) -> JSONResponse:
    """One readable sentence instead of FastAPI's list of error objects."""
    parts = []
    for error in err.errors():
        field = ".".join(str(p) for p in error["loc"] if p not in ("body", "query", "path"))
        parts.append(f"{field}: {error['msg']}" if field else error["msg"])
    return JSONResponse({"detail": "; ".join(parts)}, status_code=422)


async def not_found(_request: Request, err: NotFound) -> JSONResponse:
    return JSONResponse({"detail": str(err)}, status_code=404)


async def bad_input(_request: Request, err: InputError) -> JSONResponse:
    return JSONResponse({"detail": str(err)}, status_code=422)


async def overloaded(_request: Request, err: Overloaded) -> JSONResponse:
    return JSONResponse({"detail": str(err)}, status_code=503, headers={"Retry-After": str(err.retry_after)})


EXCEPTION_HANDLERS = {
    RequestValidationError: validation_error,
    NotFound: not_found,
    InputError: bad_input,
    Overloaded: overloaded,
}
