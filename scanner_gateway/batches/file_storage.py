"""Batch files on disk (a volume all gateway processes share): uploads, and the output
and error files the workers write. Every read and write runs in a worker thread."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

COPY_CHUNK = 1024 * 1024


class FileStorage:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        if not file_id.replace("-", "").replace("_", "").isalnum():  # ids are ours; never a path
            raise ValueError(f"not a file id: {file_id!r}")
        return self.root / file_id

    async def save(self, file_id: str, source: BinaryIO) -> int:
        """Copy an upload (already spooled to disk by the multipart parser) in; its size."""
        return await asyncio.to_thread(self._save, file_id, source)

    def _save(self, file_id: str, source: BinaryIO) -> int:
        source.seek(0)
        partial = self.root / f".{file_id}.{uuid.uuid4().hex}.part"
        with partial.open("wb") as target:
            shutil.copyfileobj(source, target, COPY_CHUNK)
            target.flush()
            os.fsync(target.fileno())
            size = target.tell()
        partial.replace(self.path(file_id))
        return size

    async def read_range(self, file_id: str, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(self._read_range, file_id, offset, length)

    def _read_range(self, file_id: str, offset: int, length: int) -> bytes:
        with self.path(file_id).open("rb") as file:
            file.seek(offset)
            return file.read(length)

    async def write(self, file_id: str, chunks: AsyncIterator[bytes]) -> int:
        """Write a file from chunks made as it goes (pages of a batch's answers), whole or
        not at all (written aside, then renamed); its size."""
        partial = self.root / f".{file_id}.{uuid.uuid4().hex}.part"
        target = await asyncio.to_thread(partial.open, "wb")
        try:
            try:
                async for chunk in chunks:
                    await asyncio.to_thread(target.write, chunk)
                await asyncio.to_thread(_sync, target)
                size = target.tell()
            finally:
                await asyncio.to_thread(target.close)
            await asyncio.to_thread(partial.replace, self.path(file_id))
        except BaseException:
            await asyncio.to_thread(partial.unlink, True)
            raise
        return size

    async def delete(self, file_id: str) -> None:
        await asyncio.to_thread(self.path(file_id).unlink, True)


def _sync(file: BinaryIO) -> None:
    file.flush()
    os.fsync(file.fileno())
