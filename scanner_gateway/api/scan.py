"""POST /v1/scan (multipart, JSON, or the photo itself as the body) and GET /v1/tasks."""

from __future__ import annotations

import codecs
import sys
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Any, get_args

from fastapi import APIRouter, Header, Request
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from starlette.datastructures import FormData, ImmutableMultiDict, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from scanner_gateway.admission import PRIORITY_CLASSES, PriorityClass, parse_priority
from scanner_gateway.api.deps import (
    RegistryDep,
    ScanServiceDep,
    SettingsDep,
    error_responses,
    scoped_idempotency_key,
)
from scanner_gateway.api.disconnect import cancel_on_disconnect
from scanner_gateway.api.paths import SCAN_PATH
from scanner_gateway.errors import (
    ImageTooLarge,
    InvalidRequest,
    UnsupportedMedia,
    echo,
    invalid_request_from,
)
from scanner_gateway.scan.results import ScanResult
from scanner_gateway.scan.scan_models import image_part_url
from scanner_gateway.scan.tasks import Locale, parse_locale

router = APIRouter(tags=["scan"])

MAX_FORM_FILES = 16
FORM_FIELDS = ("task", "locale", "priority", "image")
QUERY_FIELDS = ("task", "locale", "priority")  # with a raw photo body
RAW_BODY_TYPES = ("image/", "application/octet-stream")
PRIORITY_FIELD_HELP = "interactive or batch; overrides the X-Priority header."


@dataclass(frozen=True)
class ScanForm:
    """What a scan request asks for, whichever body it came in."""

    task: str
    images: Sequence[bytes | str]
    locale: Locale | None
    priority: str | None


def image_ref_of(item: Any) -> Any:
    """The URL of a photo given as an object: `{"url": ...}` or an OpenAI content part
    (`{"type": "image_url", "image_url": {"url": ...}}`, `{"type": "input_image",
    "image_url": ...}`), so parts copied from a chat request work here too."""
    if not isinstance(item, dict):
        return item
    url = image_part_url(item) if "image_url" in item else item.get("url")
    if not isinstance(url, str):
        raise ValueError('an image given as an object needs a "url" (or "image_url") string')
    return url


ImageRef = Annotated[str, BeforeValidator(image_ref_of)]


class ScanJSONRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field(description="Task name, see GET /v1/tasks.")
    images: list[ImageRef] = Field(
        min_length=1,
        max_length=MAX_FORM_FILES,
        description="Data URLs or bare base64 strings (or objects holding one: "
        '`{"url": ...}` or an OpenAI `image_url` part); http(s) URLs only from hosts the '
        "operator allows (SCANNER_IMAGE_URL_HOSTS).",
    )
    locale: Locale | None = None
    priority: PriorityClass | None = Field(default=None, description=PRIORITY_FIELD_HELP)


class InMemoryMultiPartParser(MultiPartParser):
    """Starlette's multipart parser with the photos kept in memory. Starlette spools a file
    part over 1 MiB to a temporary file, chunk by chunk through the thread pool: 3.6 ms of
    CPU per 1.4 MB phone photo against 0.57 ms in memory, five times fewer uploads a second
    per worker. What one request and all of them together may hold is capped already
    (api/limits.py BodySizeLimit), so the disk bought nothing."""

    spool_max_size = sys.maxsize


async def _read_form(request: Request) -> FormData:
    try:
        async with aclosing(request.stream()) as stream:
            parser = InMemoryMultiPartParser(request.headers, stream, max_files=MAX_FORM_FILES,
                                             max_fields=MAX_FORM_FILES)
            return await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"malformed multipart body: {exc.message}") from exc


def _refuse_repeats(fields: ImmutableMultiDict, names: Sequence[str], kind: str) -> None:
    """A single-valued field given twice is ambiguous: say so rather than pick one."""
    for name in names:
        if len(fields.getlist(name)) > 1:
            raise InvalidRequest(f"{kind} '{name}' is given more than once", param=name)


async def _from_form(request: Request, max_image_bytes: int) -> ScanForm:
    form = await _read_form(request)
    try:
        return await _scan_form(form, max_image_bytes)
    finally:
        await form.close()


async def _scan_form(form: FormData, max_image_bytes: int) -> ScanForm:
    unknown = sorted(set(form.keys()) - set(FORM_FIELDS))
    if unknown:
        raise InvalidRequest(
            f"unknown form field(s) {echo(unknown)}; expected {', '.join(FORM_FIELDS)} "
            "(send photos in the 'image' field)",
            param=unknown[0][:64],
        )
    _refuse_repeats(form, QUERY_FIELDS, "form field")
    task = form.get("task")
    if not isinstance(task, str) or not task:
        raise InvalidRequest("form field 'task' is required", param="task")
    images: list[bytes] = []
    for item in form.getlist("image"):
        if not isinstance(item, UploadFile):
            raise InvalidRequest("'image' must be a file upload (curl -F image=@photo.jpg)", param="image")
        if item.size is not None and item.size > max_image_bytes:
            raise ImageTooLarge(
                f"image {item.filename!r} is {item.size} bytes; the limit is {max_image_bytes}",
                param="image",
            )
        images.append(await item.read())
    priority = form.get("priority")
    return ScanForm(task, images, parse_locale(form.get("locale")), priority if isinstance(priority, str) else None)


async def _from_json(request: Request) -> ScanForm:
    try:
        # Windows tools (PowerShell's Out-File, Notepad) start files with a BOM; RFC 8259 lets us skip it.
        body = ScanJSONRequest.model_validate_json((await request.body()).removeprefix(codecs.BOM_UTF8))
    except ValidationError as exc:
        raise invalid_request_from(exc.errors()) from exc
    return ScanForm(body.task, body.images, body.locale, body.priority)


async def _from_raw_body(request: Request) -> ScanForm:
    """The photo itself as the body (what camera firmware and `curl --data-binary` send),
    the rest in the query string: `POST /v1/scan?task=price_tags`."""
    query = request.query_params
    unknown = sorted(set(query.keys()) - set(QUERY_FIELDS))
    if unknown:
        raise InvalidRequest(
            f"unknown query parameter(s) {unknown}; expected {', '.join(QUERY_FIELDS)}", param=unknown[0]
        )
    _refuse_repeats(query, QUERY_FIELDS, "query parameter")
    task = query.get("task")
    if not task:
        raise InvalidRequest(
            "query parameter 'task' is required with a photo as the body (POST /v1/scan?task=product_scan)",
            param="task",
        )
    return ScanForm(task, [await request.body()], parse_locale(query.get("locale")), query.get("priority"))


@router.post(
    SCAN_PATH,
    response_model=ScanResult,
    responses=error_responses(400, 401, 404, 413, 415, 422, 429, 502, 503, 504),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["task", "image"],
                        "properties": {
                            "task": {"type": "string", "minLength": 1},
                            "locale": {"type": "string", "enum": list(get_args(Locale))},
                            "priority": {
                                "type": "string",
                                "enum": list(PRIORITY_CLASSES),
                                "description": PRIORITY_FIELD_HELP,
                            },
                            "image": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                            },
                        },
                    }
                },
                "application/json": {"schema": ScanJSONRequest.model_json_schema()},
                "image/*": {
                    "schema": {
                        "type": "string",
                        "format": "binary",
                        "description": "One photo as the body; task, locale and priority in the query string.",
                    }
                },
            },
        },
        "parameters": [
            {"name": name, "in": "query", "required": False, "schema": {"type": "string"},
             "description": "Only with a photo as the body (image/* or application/octet-stream)."}
            for name in QUERY_FIELDS
        ],
    },
)
async def scan(
    request: Request,
    service: ScanServiceDep,
    settings: SettingsDep,
    x_priority: Annotated[
        str | None, Header(description="interactive (default) or batch; a `priority` field wins.")
    ] = None,
    idempotency_key: Annotated[  # declared for the OpenAPI document; read by scoped_idempotency_key
        str | None, Header(description="Repeat a request with the same key to get its first result.")
    ] = None,
) -> ScanResult:
    """Scan one or more photos with a retail task; returns the typed result."""
    priority = parse_priority(x_priority, settings.scan_priority)
    key = scoped_idempotency_key(request)  # checked before the body is read
    if key is None:  # a repeat with a key may be answered from the cache, overloaded or not
        service.refuse_early_if_overloaded()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await _from_form(request, service.normalizer.max_bytes)
    elif content_type == "application/json":
        form = await _from_json(request)
    elif content_type.startswith(RAW_BODY_TYPES):
        form = await _from_raw_body(request)
    else:
        raise UnsupportedMedia(
            f"content type {content_type or '(none)'!r} is not accepted; use multipart/form-data, "
            "application/json, or the photo itself (image/jpeg, ...) with ?task=<task>",
            param="content-type",
        )
    priority = parse_priority(form.priority, priority, param="priority")
    return await cancel_on_disconnect(
        request, service.run(form.task, form.images, form.locale, priority=priority, idempotency_key=key)
    )


@router.get("/v1/tasks", responses=error_responses(401))
async def list_tasks(registry: RegistryDep) -> dict[str, Any]:
    """Every scan task with its limits and result schema."""
    return {"object": "list", "data": [task.public() for task in registry]}


@router.get("/v1/tasks/{name}", responses=error_responses(401, 404))
async def get_task(name: str, registry: RegistryDep) -> dict[str, Any]:
    return registry.get(name).public()
