"""OpenAI's Files and Batches APIs (`client.files.*`, `client.batches.*` of the OpenAI
SDKs): upload a JSONL of requests, run it as a batch, download the answers. Routes only
read the request and call the batch service; every key sees its own files and batches."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from scanner_gateway.api.auth import client_scope
from scanner_gateway.api.deps import error_responses
from scanner_gateway.api.paths import BATCHES_PATH, FILES_PATH
from scanner_gateway.api.state import gateway_state
from scanner_gateway.batches.objects import BatchObject, FileObject, ListPage
from scanner_gateway.batches.service import BatchService
from scanner_gateway.errors import InvalidRequest, UnsupportedMedia

router = APIRouter(tags=["batches"])
MAX_PAGE = 100
FILE_FORM_FIELDS = 8  # purpose, file, and the SDKs' optional expires_after[...] fields


async def get_batches(request: Request) -> BatchService:
    return gateway_state(request.app).batches


BatchesDep = Annotated[BatchService, Depends(get_batches)]


async def get_owner(request: Request) -> str:
    """The caller's key, as a tag: what scopes files and batches."""
    return client_scope(request.headers.get("authorization"))


OwnerDep = Annotated[str, Depends(get_owner)]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="Items per page.")]
After = Annotated[str | None, Query(description="The last id of the previous page.")]


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str = Field(max_length=128)
    endpoint: str = Field(description="What every line calls: /v1/scan, /v1/chat/completions, "
                          "/v1/completions or /v1/responses.")
    completion_window: str = Field("24h", description="24h, the one window offered (as OpenAI's).")
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, Any] | None = Field(
        None, description="Accepted for the SDKs' sake; output files are kept until deleted.")


def _page(items: list[Any], has_more: bool) -> ListPage:
    return ListPage(data=items, first_id=items[0].id if items else None,
                    last_id=items[-1].id if items else None, has_more=has_more)


@router.post(FILES_PATH, response_model=FileObject, responses=error_responses(400, 401, 413, 415))
async def create_file(request: Request, batches: BatchesDep, owner: OwnerDep) -> FileObject:
    """Upload a batch input file (multipart: `file`, `purpose=batch`); it goes to disk as it arrives."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
        raise UnsupportedMedia("upload the file as multipart/form-data with fields 'file' and 'purpose'",
                               param="content-type")
    form = await request.form(max_files=1, max_fields=FILE_FORM_FIELDS)
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("form field 'file' (a file upload) is required", param="file")
        if not isinstance(purpose, str):
            raise InvalidRequest("form field 'purpose' is required (batch)", param="purpose")
        return await batches.create_file(owner, upload.filename or "", purpose, upload.file)
    finally:
        await form.close()


@router.get(FILES_PATH, response_model=ListPage, responses=error_responses(400, 401))
async def list_files(batches: BatchesDep, owner: OwnerDep, limit: Limit = 20, after: After = None) -> ListPage:
    return _page(*await batches.list_files(owner, limit, after))


@router.get(FILES_PATH + "/{file_id}", response_model=FileObject, responses=error_responses(401, 404))
async def retrieve_file(file_id: str, batches: BatchesDep, owner: OwnerDep) -> FileObject:
    return await batches.get_file(owner, file_id)


@router.get(FILES_PATH + "/{file_id}/content", responses=error_responses(401, 404))
async def file_content(file_id: str, batches: BatchesDep, owner: OwnerDep) -> FileResponse:
    """The file's bytes (a batch's output and error files are JSONL, one answer per line)."""
    file, path = await batches.file_path(owner, file_id)
    return FileResponse(path, media_type="application/jsonl", filename=file.filename)


@router.delete(FILES_PATH + "/{file_id}", responses=error_responses(401, 404, 409))
async def delete_file(file_id: str, batches: BatchesDep, owner: OwnerDep) -> dict[str, Any]:
    await batches.delete_file(owner, file_id)
    return {"id": file_id, "object": "file", "deleted": True}


@router.post(BATCHES_PATH, response_model=BatchObject, responses=error_responses(400, 401, 404))
async def create_batch(body: CreateBatchRequest, batches: BatchesDep, owner: OwnerDep) -> BatchObject:
    """Run every line of an uploaded file; lines that are not requests go to the error file."""
    return await batches.create_batch(owner, body.input_file_id, body.endpoint, body.completion_window,
                                      body.metadata)


@router.get(BATCHES_PATH, response_model=ListPage, responses=error_responses(400, 401))
async def list_batches(batches: BatchesDep, owner: OwnerDep, limit: Limit = 20, after: After = None) -> ListPage:
    """This key's batches, newest first."""
    return _page(*await batches.list_batches(owner, limit, after))


@router.get(BATCHES_PATH + "/{batch_id}", response_model=BatchObject, responses=error_responses(401, 404))
async def retrieve_batch(batch_id: str, batches: BatchesDep, owner: OwnerDep) -> BatchObject:
    return await batches.get_batch(owner, batch_id)


@router.post(BATCHES_PATH + "/{batch_id}/cancel", response_model=BatchObject,
             responses=error_responses(401, 404, 409))
async def cancel_batch(batch_id: str, batches: BatchesDep, owner: OwnerDep) -> BatchObject:
    """Requests not yet started are not sent; those running finish; then the files are written."""
    return await batches.cancel_batch(owner, batch_id)
