"""What the Files and Batches routes call: one method per action, owners kept apart.

`owner` is a tag of the caller's API key (`client_scope`): a key sees and touches only
its own files and batches; another key's ids answer 404, as ids that do not exist.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from scanner_gateway.batches.file_storage import FileStorage
from scanner_gateway.batches.input_lines import read_input_file
from scanner_gateway.batches.objects import (
    COMPLETION_WINDOWS,
    BatchObject,
    FileObject,
    RequestCounts,
)
from scanner_gateway.batches.store import BatchStore
from scanner_gateway.errors import BatchStateConflict, InvalidRequest, NotFound, echo

FILE_PURPOSES = ("batch",)
MAX_FILENAME_CHARS = 255
MAX_METADATA_PAIRS = 16  # OpenAI's limits on a batch's metadata
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


@dataclass(frozen=True)
class BatchLimits:
    endpoints: frozenset[str]
    max_items: int
    max_line_bytes: int


class BatchService:
    def __init__(self, store: BatchStore, storage: FileStorage, limits: BatchLimits,
                 on_new_batch: asyncio.Event | None = None) -> None:
        self.store = store
        self.storage = storage
        self.limits = limits
        self.on_new_batch = on_new_batch  # wakes this process's worker at once

    async def create_file(self, owner: str, filename: str, purpose: str, source: BinaryIO) -> FileObject:
        if purpose not in FILE_PURPOSES:
            raise InvalidRequest(f"purpose must be one of {', '.join(FILE_PURPOSES)}; got {echo(purpose)}",
                                 param="purpose")
        file_id = f"file-{uuid.uuid4().hex}"
        size = await self.storage.save(file_id, source)
        file = FileObject(id=file_id, bytes=size, created_at=int(time.time()),
                          filename=(filename or "upload.jsonl")[:MAX_FILENAME_CHARS], purpose="batch")
        await self.store.add_file(file, owner)
        return file

    async def get_file(self, owner: str, file_id: str) -> FileObject:
        file = await self.store.get_file(file_id, owner)
        if file is None:
            raise NotFound(f"no file {echo(file_id)}", param="file_id")
        return file

    async def file_path(self, owner: str, file_id: str) -> tuple[FileObject, Path]:
        file = await self.get_file(owner, file_id)
        return file, self.storage.path(file.id)

    async def list_files(self, owner: str, limit: int, after: str | None) -> tuple[list[FileObject], bool]:
        files = await self.store.list_files(owner, limit + 1, after)
        return files[:limit], len(files) > limit

    async def delete_file(self, owner: str, file_id: str) -> None:
        await self.get_file(owner, file_id)
        if await self.store.file_in_use(file_id):
            raise BatchStateConflict(f"file {file_id} is the input of a running batch; cancel the batch first",
                                     param="file_id")
        if not await self.store.delete_file(file_id, owner, int(time.time())):
            raise NotFound(f"no file {echo(file_id)}", param="file_id")
        await self.storage.delete(file_id)

    async def create_batch(self, owner: str, input_file_id: str, endpoint: str, completion_window: str,
                           metadata: dict[str, str] | None) -> BatchObject:
        if endpoint not in self.limits.endpoints:
            raise InvalidRequest(
                f"endpoint must be one of {', '.join(sorted(self.limits.endpoints))}; got {echo(endpoint)}",
                param="endpoint")
        if completion_window not in COMPLETION_WINDOWS:
            raise InvalidRequest(f"completion_window must be one of {', '.join(COMPLETION_WINDOWS)}; "
                                 f"got {echo(completion_window)}", param="completion_window")
        _check_metadata(metadata)
        file = await self.store.get_file(input_file_id, owner)
        if file is None or file.purpose != "batch":
            raise NotFound(f"no batch input file {echo(input_file_id)} (upload it with purpose 'batch')",
                           param="input_file_id")
        lines = await asyncio.to_thread(
            read_input_file, self.storage.path(file.id), endpoint,
            max_items=self.limits.max_items, max_line_bytes=self.limits.max_line_bytes,
        )
        now = int(time.time())
        batch = BatchObject(
            id=f"batch_{uuid.uuid4().hex}", endpoint=endpoint, input_file_id=file.id,
            completion_window=completion_window, status="in_progress", created_at=now, in_progress_at=now,
            expires_at=now + COMPLETION_WINDOWS[completion_window],
            request_counts=RequestCounts(total=len(lines), failed=sum(1 for ln in lines if ln.error_code)),
            metadata=metadata,
        )
        await self.store.add_batch(batch, owner, lines)
        if self.on_new_batch is not None:
            self.on_new_batch.set()
        return batch

    async def get_batch(self, owner: str, batch_id: str) -> BatchObject:
        batch = await self.store.get_batch(batch_id, owner)
        if batch is None:
            raise NotFound(f"no batch {echo(batch_id)}", param="batch_id")
        return batch

    async def list_batches(self, owner: str, limit: int, after: str | None) -> tuple[list[BatchObject], bool]:
        batches = await self.store.list_batches(owner, limit + 1, after)
        return batches[:limit], len(batches) > limit

    async def cancel_batch(self, owner: str, batch_id: str) -> BatchObject:
        batch = await self.get_batch(owner, batch_id)
        if not await self.store.cancel(batch_id, owner, int(time.time())):
            if batch.status in ("cancelling", "cancelled"):
                return batch  # cancelling twice is not an error
            raise BatchStateConflict(f"batch {batch_id} is {batch.status}; only a running batch can be cancelled",
                                     param="batch_id")
        return await self.get_batch(owner, batch_id)


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_PAIRS or any(
        len(key) > MAX_METADATA_KEY_CHARS or len(value) > MAX_METADATA_VALUE_CHARS for key, value in metadata.items()
    ):
        raise InvalidRequest(
            f"metadata takes at most {MAX_METADATA_PAIRS} pairs, keys up to {MAX_METADATA_KEY_CHARS} and values up "
            f"to {MAX_METADATA_VALUE_CHARS} characters", param="metadata")
