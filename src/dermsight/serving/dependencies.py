"""FastAPI dependency providers: what a route needs, from the state that ``create_app``
gives the app. Use the ``...Dep`` aliases as parameter types, e.g. ``storage: StorageDep``.

The providers are ``async`` so that FastAPI calls them on the event loop instead of
sending each one to a worker thread."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse

from dermsight.inference.predictor import Predictor
from dermsight.serving.limits import Admission
from dermsight.serving.reference import RiskReference
from dermsight.serving.schemas import DISCLAIMER
from dermsight.serving.scoring import Scorer
from dermsight.serving.security import Authenticator, FailureLimiter, Principal, allows
from dermsight.serving.storage.repository import Storage


async def get_predictor(request: Request) -> Predictor:
    """The one Predictor of the loaded bundle."""
    return request.app.state.predictor


async def get_reference(request: Request) -> RiskReference | None:
    """The loaded bundle's validation risks (what a risk meant); None for a bundle without them."""
    return request.app.state.risk_reference


async def get_storage(request: Request) -> Storage:
    """The rows and files."""
    return request.app.state.storage


async def get_scorer(request: Request) -> Scorer:
    """Scores uploads and patients and stores the predictions."""
    return request.app.state.scorer


async def get_admission(request: Request) -> Admission:
    """Bounds how many scorings run and wait at once."""
    return request.app.state.admission


async def get_auth(request: Request) -> Authenticator | None:
    """The API keys and browser sessions; None in dev mode (no keys needed)."""
    return request.app.state.auth


async def get_failures(request: Request) -> FailureLimiter:
    """Failed sign-ins and invalid keys, per client address and per key prefix."""
    return request.app.state.failures


async def get_principal(request: Request) -> Principal | None:
    """The key the request acts for (set by the AccessControl middleware); None in dev mode
    and on public paths."""
    return getattr(request.state, "principal", None)


PredictorDep = Annotated[Predictor, Depends(get_predictor)]
StorageDep = Annotated[Storage, Depends(get_storage)]
ReferenceDep = Annotated[RiskReference | None, Depends(get_reference)]
ScorerDep = Annotated[Scorer, Depends(get_scorer)]
AdmissionDep = Annotated[Admission, Depends(get_admission)]
AuthDep = Annotated[Authenticator | None, Depends(get_auth)]
FailuresDep = Annotated[FailureLimiter, Depends(get_failures)]
PrincipalDep = Annotated[Principal | None, Depends(get_principal)]


class Page:
    """Renders a page template with what every page shows (the disclaimer, whether keys
    are on, whether a browser session is signed in, and what its role may do: `may.upload`
    (clinician) and `may.delete` (admin); everything without keys)."""

    def __init__(self, request: Request, auth: Authenticator | None, principal: Principal | None):
        self.request = request
        role = principal.role if principal is not None else "admin" if auth is None else "read"
        self.common = {"disclaimer": DISCLAIMER, "signed_in": principal is not None and principal.via == "session",
                       "auth": auth is not None, "role": role,
                       "may": {"upload": allows(role, "clinician"), "delete": allows(role, "admin")},
                       "operating_point": request.app.state.operating_point,
                       "heatmap_fit": request.app.state.predictor.bundle.preprocessing.fit}

    def __call__(self, name: str, status_code: int = 200, **context) -> HTMLResponse:
        templates = self.request.app.state.templates
        return templates.TemplateResponse(self.request, name, {**self.common, **context}, status_code=status_code)


async def get_page(request: Request, auth: AuthDep, principal: PrincipalDep) -> Page:
    """The page renderer for this request."""
    return Page(request, auth, principal)


PageDep = Annotated[Page, Depends(get_page)]
