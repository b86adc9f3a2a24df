"""HTTP endpoints of the SMART authorization server (FastAPI router).

Discovery (``/.well-known/smart-configuration``, ``/.well-known/openid-configuration``,
``/auth/jwks``), the authorization endpoint with its login, patient-picker and consent pages
(``/auth/authorize``), and the token, introspection (RFC 7662) and revocation (RFC 7009)
endpoints. Only HTTP concerns live here: reading forms and cookies, rendering pages, redirects,
RFC 6749 error bodies, and the audit calls; the rules are in the modules these routes call.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from functools import cache
from typing import Any

from authlib.common.urls import add_params_to_uri
from authlib.oauth2.rfc6749.errors import (
    AccessDeniedError,
    InvalidRequestError,
    OAuth2Error,
)
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from fhir_server.auth import authorize as authz
from fhir_server.auth.clients import identify_client
from fhir_server.auth.discovery import openid_configuration, smart_configuration
from fhir_server.auth.login import LoginFailed
from fhir_server.auth.principal import Role
from fhir_server.auth.server import AuthServer
from fhir_server.auth.session import SESSION_COOKIE, FlowError
from fhir_server.auth.token_endpoint import TokenRequest
from fhir_server.auth.tokens import TokenError
from fhir_server.auth.users import User

router = APIRouter()

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
PAGE_HEADERS = {
    **NO_STORE,
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
FORM_TYPE = "application/x-www-form-urlencoded"
SMART_STYLE = {
    "color_background": "#edeae3",
    "color_error": "#9e2d2d",
    "color_highlight": "#69b5ce",
    "color_modal_backdrop": "",
    "color_success": "#498e49",
    "color_text": "#303030",
    "dim_border_radius": "6px",
    "dim_font_size": "13px",
    "dim_spacing_size": "20px",
    "font_family_body": "system-ui, sans-serif",
    "font_family_heading": "system-ui, sans-serif",
}


# -- helpers -------------------------------------------------------------------------------------


def _auth(request: Request) -> AuthServer:
    return request.app.state.auth


def _fhir_base(request: Request) -> str:
    base = _auth(request).tokens.fhir_base(str(request.base_url).rstrip("/") + "/fhir")
    assert base is not None
    return base


def _issuer(request: Request) -> str:
    return _auth(request).tokens.issuer_for(_fhir_base(request))


def _param(params: list[tuple[str, str]], name: str) -> str | None:
    return next((v for k, v in params if k == name), None)


def _source(request: Request) -> str | None:
    return request.client.host if request.client else None


async def _audit(request: Request, kind: str, success: bool, **details: Any) -> None:
    """Hand an authentication event to the audit trail (``app.state.audit``) when present."""
    audit = getattr(request.app.state, "audit", None)
    if audit is not None:
        await run_in_threadpool(audit.auth_event, kind, success, source=_source(request), **details)


@cache
def _templates() -> Environment:
    return Environment(
        loader=PackageLoader("fhir_server.auth", "templates"),
        autoescape=select_autoescape(["html"]),
    )


def _page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = _templates().get_template(name).render(**context)
    return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)


def _error_page(message: str, status: int = 400) -> HTMLResponse:
    return _page("error.html", status, title="Sign-in request rejected", error=message)


def _flow_page(
    request: Request, name: str, flow: dict[str, Any], sid: str, **context: Any
) -> HTMLResponse:
    """A page of the login flow: carries the signed flow and CSRF token; sets the cookie."""
    signer = _auth(request).flows
    response = _page(
        name,
        flow=signer.dump(flow, sid),
        csrf=signer.csrf_token(sid),
        client_id=flow["client_id"],
        **context,
    )
    if request.cookies.get(SESSION_COOKIE) != sid:
        response.set_cookie(
            SESSION_COOKIE,
            sid,
            max_age=_auth(request).settings.auth_flow_ttl,
            path="/auth",
            httponly=True,
            samesite="lax",
            secure=_issuer(request).startswith("https://"),
        )
    return response


def _oauth_json(error: OAuth2Error) -> JSONResponse:
    headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
    return JSONResponse(
        dict(error.get_body()), status_code=error.status_code or 400, headers=headers
    )


def _redirect(url: str, status: int = 303) -> RedirectResponse:
    return RedirectResponse(url, status_code=status, headers=NO_STORE)


def _redirect_error(error: OAuth2Error, status: int = 302) -> RedirectResponse:
    assert error.redirect_uri
    return _redirect(add_params_to_uri(error.redirect_uri, error.get_body()), status)


async def _form(request: Request) -> list[tuple[str, str]]:
    form = await request.form()
    return [(k, v) for k, v in form.multi_items() if isinstance(v, str)]


async def _oauth_form(request: Request) -> dict[str, str]:
    """The fields of an OAuth POST; ``invalid_request`` for another body type or a repeat."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != FORM_TYPE:
        raise InvalidRequestError(description=f"The body must be {FORM_TYPE}")
    fields: dict[str, str] = {}
    for key, value in await _form(request):
        if key in fields:
            raise InvalidRequestError(description=f"Parameter {key} is repeated")
        fields[key] = value
    return fields


async def _flow_form(request: Request) -> tuple[dict[str, str], dict[str, Any], str]:
    """The posted form, its verified flow and the session id; raises :class:`FlowError`."""
    fields: dict[str, str] = {}
    multi: dict[str, list[str]] = {}
    for key, value in await _form(request):
        fields.setdefault(key, value)
        multi.setdefault(key, []).append(value)
    sid = request.cookies.get(SESSION_COOKIE)
    signer = _auth(request).flows
    signer.check_csrf(sid, fields.get("csrf"))
    flow = signer.load(fields.get("flow"), sid)
    fields["scope"] = " ".join(multi.get("scope", []))
    assert sid is not None
    return fields, flow, sid


def _active_user(request: Request, flow: dict[str, Any]) -> User:
    user = _auth(request).users.get(flow.get("user") or "")
    if user is None or user.disabled:
        raise FlowError("Sign in again")
    return user


# -- discovery -----------------------------------------------------------------------------------


@router.get("/.well-known/smart-configuration")
@router.get("/fhir/.well-known/smart-configuration")
async def smart_config(request: Request) -> JSONResponse:
    """SMART App Launch discovery document."""
    return JSONResponse(smart_configuration(_issuer(request)))


@router.get("/.well-known/openid-configuration")
async def openid_config(request: Request) -> JSONResponse:
    """OpenID Connect discovery document."""
    return JSONResponse(openid_configuration(_issuer(request)))


@router.get("/auth/jwks")
async def jwks(request: Request) -> JSONResponse:
    """The public keys that verify this server's access and ID tokens."""
    keys = await run_in_threadpool(_auth(request).keys.jwks)
    return JSONResponse(keys, headers={"Cache-Control": "public, max-age=300"})


@router.get("/auth/smart-style.json")
async def smart_style() -> JSONResponse:
    """The style hints apps get as ``smart_style_url``."""
    return JSONResponse(SMART_STYLE, headers={"Cache-Control": "public, max-age=3600"})


# -- authorization endpoint ------------------------------------------------------------------------


@router.api_route("/auth/authorize", methods=["GET", "POST"])
async def authorize(request: Request) -> Response:
    """Start an authorization: validate the request, then show the login form."""
    if request.method == "POST":
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != FORM_TYPE:
            return _error_page(f"The authorization request must be {FORM_TYPE}")
        params = await _form(request)
    else:
        params = list(request.query_params.multi_items())
    auth = _auth(request)
    try:
        flow = await run_in_threadpool(
            authz.validate_request,
            params,
            clients=auth.clients,
            grants=auth.grants,
            fhir_base=_fhir_base(request),
        )
    except authz.PageError as exc:
        await _audit(
            request, "authorize", False, client_id=_param(params, "client_id"), detail=str(exc)
        )
        return _error_page(str(exc))
    except OAuth2Error as exc:
        detail = f"{exc.error}: {exc.description}"
        await _audit(
            request, "authorize", False, client_id=_param(params, "client_id"), detail=detail
        )
        return _redirect_error(exc, 303 if request.method == "POST" else 302)
    sid = request.cookies.get(SESSION_COOKIE) or auth.flows.new_session_id()
    return _flow_page(
        request, "login.html", flow, sid, title="Sign in", action="/auth/authorize/login"
    )


@router.post("/auth/authorize/login")
async def login(request: Request) -> Response:
    """Check the credentials posted from the login form."""
    auth = _auth(request)
    try:
        fields, flow, sid = await _flow_form(request)
    except FlowError as exc:
        return _error_page(str(exc))
    username = fields.get("username", "")
    try:
        user = await run_in_threadpool(
            auth.logins.login,
            username,
            fields.get("password", ""),
            fields.get("totp"),
            source=_source(request),
        )
    except LoginFailed as exc:
        detail = "locked" if exc.locked_until else "bad credentials"
        await _audit(
            request,
            "login",
            False,
            subject=username[:128],
            detail=detail,
            client_id=flow["client_id"],
        )
        response = _flow_page(
            request,
            "login.html",
            flow,
            sid,
            title="Sign in",
            action="/auth/authorize/login",
            error=str(exc),
            username=username,
        )
        response.status_code = 429 if exc.locked_until else 200
        return response
    await _audit(request, "login", True, subject=user.username, client_id=flow["client_id"])
    flow = {**flow, "user": user.username, "auth_time": int(time.time())}
    if user.role is Role.PATIENT and "launch/patient" in flow["scope"].split():
        flow["context"] = {**flow["context"], "patient": user.patient}
    return await _next_step(request, flow, sid, user)


async def _next_step(
    request: Request, flow: dict[str, Any], sid: str, user: User, **extra: Any
) -> Response:
    if authz.needs_patient_choice(flow, user):
        return await _picker(request, flow, sid, user, **extra)
    scopes = [(s, authz.describe_scope(s)) for s in flow["scope"].split()]
    return _flow_page(
        request,
        "consent.html",
        flow,
        sid,
        title="Allow access?",
        action="/auth/authorize/consent",
        username=user.username,
        patient=flow["context"].get("patient"),
        scopes=scopes,
    )


async def _picker(
    request: Request,
    flow: dict[str, Any],
    sid: str,
    user: User,
    *,
    q: str | None = None,
    error: str | None = None,
) -> Response:
    patients = await run_in_threadpool(
        authz.find_patients,
        request.app.state.repo,
        principal=authz.picker_principal(user, flow["client_id"]),
        fhir_base=_fhir_base(request),
        settings=_auth(request).settings,
        name=q or None,
    )
    return _flow_page(
        request,
        "patients.html",
        flow,
        sid,
        title="Choose a patient",
        action="/auth/authorize/patient",
        username=user.username,
        patients=patients,
        q=q,
        error=error,
    )


@router.post("/auth/authorize/patient")
async def choose_patient(request: Request) -> Response:
    """Patient picker of a standalone launch: search, or settle the chosen patient."""
    try:
        fields, flow, sid = await _flow_form(request)
        user = _active_user(request, flow)
    except FlowError as exc:
        return _error_page(str(exc))
    if not authz.needs_patient_choice(flow, user):
        return _error_page("No patient choice is pending")
    if fields.get("action") != "select":
        return await _picker(request, flow, sid, user, q=fields.get("q", "").strip())
    chosen = fields.get("patient", "")
    visible = await run_in_threadpool(
        authz.find_patients,
        request.app.state.repo,
        principal=authz.picker_principal(user, flow["client_id"]),
        fhir_base=_fhir_base(request),
        settings=_auth(request).settings,
        patient_id=chosen,
    )
    if not visible:
        return await _picker(request, flow, sid, user, error="Choose one of the patients listed")
    flow = {**flow, "context": {**flow["context"], "patient": chosen}}
    return await _next_step(request, flow, sid, user)


@router.post("/auth/authorize/consent")
async def consent(request: Request) -> Response:
    """The user's decision: redirect back to the app with a code, or with ``access_denied``."""
    auth = _auth(request)
    try:
        fields, flow, _sid = await _flow_form(request)
        user = _active_user(request, flow)
    except FlowError as exc:
        return _error_page(str(exc))
    if authz.needs_patient_choice(flow, user):
        return _error_page("Choose a patient first")
    offered = flow["scope"].split()
    chosen = set(fields["scope"].split())
    granted = " ".join(s for s in offered if s in chosen)
    if fields.get("decision") != "approve" or not granted:
        denied = AccessDeniedError(
            description="The user denied access",
            state=flow["state"],
            redirect_uri=flow["redirect_uri"],
        )
        return _redirect_error(denied, 303)
    code = await run_in_threadpool(
        auth.grants.create_code,
        client_id=flow["client_id"],
        username=user.username,
        redirect_uri=flow["redirect_uri"],
        scope=granted,
        code_challenge=flow["code_challenge"],
        nonce=flow["nonce"],
        context=flow["context"],
        auth_time=_utc(flow["auth_time"]),
        ttl=auth.settings.auth_code_ttl,
    )
    return _redirect(
        add_params_to_uri(flow["redirect_uri"], [("code", code), ("state", flow["state"])])
    )


def _utc(timestamp: int) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


# -- token, introspection, revocation ------------------------------------------------------------


@router.post("/auth/token")
async def token(request: Request) -> JSONResponse:
    """The token endpoint (authorization_code, refresh_token, client_credentials)."""
    auth = _auth(request)
    issuer = _issuer(request)
    form: dict[str, str] = {}
    try:
        form = await _oauth_form(request)
        req = TokenRequest(
            form=form,
            authorization=request.headers.get("authorization"),
            fhir_base=_fhir_base(request),
            token_url=f"{issuer}/auth/token",
            style_url=f"{issuer}/auth/smart-style.json",
        )
        result = await run_in_threadpool(auth.token_endpoint.handle, req)
    except OAuth2Error as exc:
        await _audit(
            request,
            _token_kind(form),
            False,
            client_id=form.get("client_id"),
            detail=f"{form.get('grant_type')}: {exc.error}: {exc.description}",
        )
        return _oauth_json(exc)
    await _audit(
        request,
        _token_kind(form),
        True,
        subject=result.subject,
        client_id=result.client_id,
        detail=result.detail,
    )
    return JSONResponse(result.body, headers=NO_STORE)


def _token_kind(form: dict[str, str]) -> str:
    return "refresh" if form.get("grant_type") == "refresh_token" else "token"


async def _calling_client(request: Request, form: dict[str, str]):  # type: ignore[no-untyped-def]
    auth = _auth(request)
    token_url = f"{_issuer(request)}/auth/token"
    return await run_in_threadpool(
        identify_client,
        form,
        request.headers.get("authorization"),
        auth.clients,
        lambda assertion: auth.assertions.verify(assertion, token_url=token_url),
    )


@router.post("/auth/introspect")
async def introspect(request: Request) -> JSONResponse:
    """RFC 7662 token introspection, for authenticated (non-public) clients."""
    auth = _auth(request)
    form: dict[str, str] = {}
    try:
        form = await _oauth_form(request)
        client, method = await _calling_client(request, form)
        if method == "none":
            raise InvalidRequestError(description="Public clients cannot introspect tokens")
        token_value = form.get("token")
        if not token_value:
            raise InvalidRequestError(description="token is required")
    except OAuth2Error as exc:
        await _audit(
            request, "introspect", False, client_id=form.get("client_id"), detail=exc.error
        )
        return _oauth_json(exc)
    body = await run_in_threadpool(_introspect, auth, token_value, _fhir_base(request))
    await _audit(
        request,
        "introspect",
        True,
        client_id=client.client_id,
        subject=body.get("sub"),
        detail="active" if body["active"] else "inactive",
    )
    return JSONResponse(body, headers=NO_STORE)


def _introspect(auth: AuthServer, token_value: str, fhir_base: str) -> dict[str, Any]:
    if token_value.count(".") == 2:
        try:
            claims = auth.tokens.verify(token_value, audience=fhir_base).claims
        except TokenError:
            return {"active": False}
        body = {"active": True, "token_type": "Bearer"}
        body.update(
            {
                k: claims[k]
                for k in (
                    "scope",
                    "client_id",
                    "sub",
                    "exp",
                    "iat",
                    "iss",
                    "aud",
                    "jti",
                    "patient",
                    "encounter",
                )
                if k in claims
            }
        )
        if claims.get("role") != Role.SYSTEM.value:
            body["username"] = claims["sub"]
        if claims.get("fhirUser"):
            body["fhirUser"] = f"{fhir_base}/{claims['fhirUser']}"
        return body
    grant = auth.grants.find_refresh_token(token_value)
    if grant is None or not grant.active:
        return {"active": False}
    user = auth.users.get(grant.username or "")
    if user is None or user.disabled:
        return {"active": False}
    return {
        "active": True,
        "token_type": "refresh_token",
        "scope": grant.scope,
        "client_id": grant.client_id,
        "sub": grant.username,
        "username": grant.username,
        "exp": int(grant.expires.timestamp()),
    }


@router.post("/auth/revoke")
async def revoke(request: Request) -> Response:
    """RFC 7009 token revocation: an access token, or a refresh token with its whole grant."""
    auth = _auth(request)
    form: dict[str, str] = {}
    try:
        form = await _oauth_form(request)
        client, _ = await _calling_client(request, form)
        token_value = form.get("token")
        if not token_value:
            raise InvalidRequestError(description="token is required")
        revoked = await run_in_threadpool(_revoke, auth, token_value, client.client_id)
    except OAuth2Error as exc:
        await _audit(request, "revoke", False, client_id=form.get("client_id"), detail=exc.error)
        return _oauth_json(exc)
    await _audit(request, "revoke", True, client_id=client.client_id, detail=revoked)
    return Response(status_code=200, headers=NO_STORE)


def _revoke(auth: AuthServer, token_value: str, client_id: str) -> str:
    """Revoke what ``token_value`` is; returns what happened (for the audit record)."""
    if token_value.count(".") == 2:
        claims = auth.tokens.claims_if_signed(token_value)
        if claims is None:
            return "unknown token"
        if claims.get("client_id") != client_id:
            raise InvalidRequestError(description="The token was issued to another client")
        auth.tokens.revoke(claims["jti"])
        return "access token"
    grant = auth.grants.find_refresh_token(token_value)
    if grant is None:
        return "unknown token"
    if grant.client_id != client_id:
        raise InvalidRequestError(description="The token was issued to another client")
    auth.grants.revoke_family(grant.family)
    return "refresh token family"
