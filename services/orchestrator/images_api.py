"""Images through the API (`vers.orchestrator.v1.ImagesService`, the official SDK's /api/v1/images): an
organization uploads a tar of a root file system, or names one of the orchestrator's recipes, and the
orchestrator builds an ext4 root disk with the Vers init from it, in the background.

Records live in the orchestrator's database, disks in the data folder (`org-images/<base_image_id>`); the
images built with the platform (`make images`, the shared images folder) are listed as public. An image made
with the administrator's key is the platform's own: public, bootable by every organization. Any other is its
organization's alone: another organization neither sees it nor boots from it (404, as a missing one).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy import UniqueConstraint, func
from sqlmodel import Field, SQLModel, select

from services.common.auth import Principal, current_principal
from services.common.db import Database, insert_unique, serialize, time_column
from services.common.errors import AlreadyExists, Conflict, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.common.names import validate_text
from services.common.settings import Settings
from services.common.timestamps import as_utc, utcnow
from services.orchestrator.images import BUILD_REFUSED, DEFAULT_IMAGE, RECIPES, DiskError, Image, check_root, find_image, list_images
from services.orchestrator.layout import Layout
from services.orchestrator.models import LayerRow
from vers.orchestrator.v1 import images_pb2 as pb
from vers.orchestrator.v1 import images_pb2_grpc

log = logging.getLogger(__name__)

CREATING, COMPLETED, FAILED = "creating", "completed", "failed"
NAME_MAX = 128
UPLOAD_MIB_DEFAULT, UPLOAD_MIB_MIN, UPLOAD_MIB_MAX = 512, 512, 32768
ROOM_MIB_DEFAULT, ROOM_MIB_MAX = 256, 32768
LIST_DEFAULT, LIST_MAX = 50, 100
UPLOAD_FIELDS = (b"file", b"tarball")
# Upload bodies read as a whole (JSON with the tar in base64) are held in memory: they obey the JSON limit.
JSON_TYPES = ("application/json",)
# An organization's uploads being received at once, and its builds running at once (the others wait their
# turn): one organization cannot hold the host's build slots (VERS_IMAGE_MAX_CONCURRENT_BUILDS) alone.
ORG_UPLOADS_IN_FLIGHT = 2
ORG_CONCURRENT_BUILDS = 1
# How much of a build's error output its image's error_message keeps.
BUILD_ERROR_CHARS = 2000


class ImageRow(SQLModel, table=True):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("org_id", "image_name"),)

    id: str = Field(primary_key=True)
    org_id: str = Field(index=True)
    image_name: str
    is_public: bool = False
    size_mib: int
    source_type: str
    description: str | None = None
    status: str = CREATING
    error_message: str = ""
    job_id: str
    created_at: datetime = Field(default_factory=utcnow, sa_column=time_column())
    # The host agent that builds it ("" on a single-host platform): a start fails only its own unfinished builds.
    host_id: str = ""


IMAGE_TABLES = [ImageRow.__table__]  # type: ignore[attr-defined]


def validate_image_name(name: str) -> str:
    if not name or len(name) > NAME_MAX or not all(c.isalnum() or c in "._-" for c in name) or not name.strip("."):
        raise InvalidArgument(f"image_name must be 1-{NAME_MAX} characters of A-Z a-z 0-9 . _ - (not only dots), not {name!r}")
    return name


def _builtin_id(name: str, folder: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"vers-image:{name}:{folder}"))


class ImageCatalog:
    """Every organization's images: their records, disks and builds, and which image a name means to whom."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        layout = Layout.of(settings)
        self.builtin_root = layout.images
        self.root = layout.org_images
        self.data_root = layout.data / "org-images"
        self.builds: set[asyncio.Task[None]] = set()
        self.build_slots = asyncio.Semaphore(settings.image_max_concurrent_builds)
        self.org_build_slots: dict[str, asyncio.Semaphore] = {}
        self.uploading: Counter[str] = Counter()
        # This host's builds, and the prefix of their scratch folders (the images' folder may be a shared store's).
        self.host_id = settings.host_name if settings.orchestrator_role == "host" else ""
        self.scratch_prefix = f".build-{hashlib.sha256(self.host_id.encode()).hexdigest()[:16]}-" if self.host_id else ".build-"

    def folder(self, row: ImageRow) -> Path:
        """The image's folder: in the shared commit store when there is one, except for an image made before it
        was set, which stays in this host's data folder (VMs and commits stand on its disk at that path)."""
        before_the_store = self.data_root / row.id
        if self.root != self.data_root and not (self.root / row.id).exists() and before_the_store.exists():
            return before_the_store
        return self.root / row.id

    async def start(self) -> None:
        """This host's builds a stop interrupted are failed (their uploads are gone); folders of no record, and
        this host's scratch folders, are removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        async with self.db.write() as session:
            interrupted = select(ImageRow).where(ImageRow.status == CREATING, ImageRow.host_id == self.host_id)
            for row in (await session.exec(interrupted)).all():
                row.status, row.error_message = FAILED, "the orchestrator stopped during the build: make the image again"
                session.add(row)
            known = set((await session.exec(select(ImageRow.id))).all())
        for folder in self.root.iterdir():
            if folder.name.startswith(self.scratch_prefix) or (not folder.name.startswith(".") and folder.name not in known):
                shutil.rmtree(folder, ignore_errors=True)

    async def close(self) -> None:
        for task in list(self.builds):
            task.cancel()
        await asyncio.gather(*self.builds, return_exceptions=True)

    def _image(self, row: ImageRow) -> Image:
        kernel = find_image(self.builtin_root, DEFAULT_IMAGE)
        if kernel is None:
            raise FailedPrecondition(f"no kernel in {self.builtin_root}: run `make images` on the platform's machine")
        return Image(row.image_name, self.folder(row), kernel.kernel_folder)

    async def lookup(self, name: str) -> Image:
        """The image `name` means to the calling organization: its own, else a public one, else one built
        with the platform; "" is the default image. Anything else is refused naming what it may boot."""
        org_id = current_principal().org_id
        async with self.db.read() as session:
            query = select(ImageRow).where(ImageRow.status == COMPLETED, (ImageRow.org_id == org_id) | ImageRow.is_public)
            rows = (await session.exec(query)).all()
        named = sorted((row for row in rows if row.image_name == name), key=lambda row: row.org_id != org_id)
        if named:
            return self._image(named[0])
        builtin = find_image(self.builtin_root, name or DEFAULT_IMAGE)
        if builtin is not None:
            return builtin
        visible = sorted({*list_images(self.builtin_root), *(row.image_name for row in rows)})
        raise InvalidArgument(f"image {name!r} does not exist; images: {', '.join(visible) or 'none: run `make images`'}")

    # The API's answers.

    def _builtins(self) -> list[pb.BaseImageInfo]:
        index_file = self.builtin_root / "index.json"
        index = json.loads(index_file.read_text())["images"] if index_file.exists() else {}
        found = []
        for name, folder in sorted(index.items(), key=lambda item: (item[0] != DEFAULT_IMAGE, item[0])):
            image = find_image(self.builtin_root, name)
            if image is None or not (image.folder / "manifest.json").exists():
                continue
            created = datetime.fromtimestamp((image.folder / "manifest.json").stat().st_mtime).astimezone()
            found.append(
                pb.BaseImageInfo(
                    base_image_id=_builtin_id(name, folder), image_name=name, owner_id="", is_public=True, size_mib=image.disk_mib,
                    source_type="builtin", created_at=created.isoformat(), status=COMPLETED,
                )
            )  # fmt: skip
        return found

    async def visible(self, principal: Principal) -> list[ImageRow]:
        async with self.db.read() as session:
            query = select(ImageRow).where((ImageRow.org_id == principal.org_id) | ImageRow.is_public)
            return sorted((await session.exec(query)).all(), key=lambda row: (row.image_name, row.org_id != principal.org_id))

    async def list_page(self, principal: Principal, limit: int, offset: int) -> pb.ListImagesResponse:
        if limit < 0 or offset < 0:
            raise InvalidArgument("limit and offset must not be negative")
        limit = min(limit or LIST_DEFAULT, LIST_MAX)
        every = [*self._builtins(), *(info_pb(row) for row in await self.visible(principal))]
        return pb.ListImagesResponse(images=every[offset : offset + limit], limit=limit, offset=offset, total=len(every))

    async def status(self, principal: Principal, name: str) -> pb.GetImageStatusResponse:
        for row in await self.visible(principal):
            if row.image_name == name:
                answer = pb.GetImageStatusResponse(image_name=name, size_mib=row.size_mib, status=row.status)
                if row.error_message:
                    answer.error_message = row.error_message
                return answer
        for info in self._builtins():
            if info.image_name == name:
                return pb.GetImageStatusResponse(image_name=name, size_mib=info.size_mib, status=COMPLETED)
        raise NotFound(f"image {name!r} not found")

    # Making images.

    async def reserve(self, principal: Principal, name: str, size_mib: int, source_type: str, description: str | None) -> ImageRow:
        """The image's record, status "creating", within the org's limits; AlreadyExists for a name it has."""
        validate_image_name(name)
        if description is not None:
            validate_text("description", description)
        if find_image(self.builtin_root, name) is not None:
            raise AlreadyExists(f"image {name!r} is built into the platform: choose another name")
        row = ImageRow(
            id=str(uuid.uuid4()), org_id=principal.org_id, image_name=name, is_public=principal.is_admin, size_mib=size_mib,
            source_type=source_type, description=description, job_id=str(uuid.uuid4()), host_id=self.host_id,
        )  # fmt: skip
        async with self.db.write() as session:
            await serialize(session, f"images:{row.org_id}")  # two uploads at once are counted one after the other (PostgreSQL)
            count, mib = (
                await session.exec(select(func.count(), func.coalesce(func.sum(ImageRow.size_mib), 0)).where(ImageRow.org_id == row.org_id))
            ).one()
            if count + 1 > self.settings.org_max_images:
                raise ResourceExhausted(
                    f"organization {principal.org_label} has {count} images, the most it may have (VERS_ORG_MAX_IMAGES="
                    f"{self.settings.org_max_images}): delete one, or ask the platform's operator to raise the limit"
                )
            if mib + size_mib > self.settings.org_max_image_mib:
                raise ResourceExhausted(
                    f"organization {principal.org_label} has images of {mib} MiB; {size_mib} MiB more is beyond its limit "
                    f"(VERS_ORG_MAX_IMAGE_MIB={self.settings.org_max_image_mib}): delete images, or ask the operator to raise it"
                )
            public = (await session.exec(select(ImageRow).where(ImageRow.image_name == name, ImageRow.is_public))).first()
            if row.is_public and public is not None:
                raise AlreadyExists(f"a public image {name!r} exists (base_image_id {public.id}): choose another name")
            await insert_unique(session, row, f"image {name!r} already exists")
        return row

    def build(self, row: ImageRow, source: Mapping[str, object], done: Callable[[], None] = lambda: None) -> None:
        """Build the image's disk in the background, in a process of its own (`images build-image`, with
        `source` in its spec); `done` runs at the end whatever happens."""
        task = asyncio.create_task(self._build(row, source, done))
        self.builds.add(task)
        task.add_done_callback(self.builds.discard)

    async def _build(self, row: ImageRow, source: Mapping[str, object], done: Callable[[], None]) -> None:
        error = ""
        try:
            org_slot = self.org_build_slots.setdefault(row.org_id, asyncio.Semaphore(ORG_CONCURRENT_BUILDS))
            async with org_slot, self.build_slots:
                error = await self._build_disk(row, source)
        except Exception as failure:  # a build's failure is the image's status, never the orchestrator's
            log.exception("building image %s", row.id)
            error = f"the build failed: {failure}"
        finally:
            done()
        async with self.db.write() as session:
            stored = await session.get(ImageRow, row.id)
            if stored is None:
                return
            stored.status, stored.error_message = (FAILED, error) if error else (COMPLETED, "")
            stored.size_mib = row.size_mib
            session.add(stored)
        if error:
            shutil.rmtree(self.folder(row), ignore_errors=True)

    async def _build_disk(self, row: ImageRow, source: Mapping[str, object]) -> str:
        """Run the build's process and wait for it at most VERS_IMAGE_BUILD_TIMEOUT_SECONDS; on timeout (or when
        the orchestrator stops) its whole process group is killed and waited for, so nothing installs a disk
        after. The error, or "" once the disk is in the image's folder (and row.size_mib its size)."""
        timeout = self.settings.image_build_timeout_seconds
        scratch = Path(tempfile.mkdtemp(dir=self.root, prefix=self.scratch_prefix))
        spec = {
            **source, "scratch": str(scratch), "target": str(self.folder(row)), "timeout": timeout,
            "manifest": {"name": row.image_name, "owner_id": row.org_id, "source_type": row.source_type},
        }  # fmt: skip
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.orchestrator.images", "build-image", json.dumps(spec),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
            )  # fmt: skip
            try:
                out, err = await asyncio.wait_for(process.communicate(), timeout)
            except TimeoutError:
                return (
                    f"the build took longer than VERS_IMAGE_BUILD_TIMEOUT_SECONDS ({timeout} s) and was stopped: "
                    "make the image again, smaller"
                )
            finally:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    await process.wait()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        message = err.decode(errors="replace").strip()
        if process.returncode == BUILD_REFUSED:
            return message[-BUILD_ERROR_CHARS:]
        if process.returncode != 0:
            log.error("building image %s failed (exit status %s): %s", row.id, process.returncode, message)
            # what a tool printed names the host's folders: it stays in the platform's log
            return f"the build failed on the platform (image {row.id} in its log): make the image again, or ask the operator"
        row.size_mib = int(json.loads(out.decode().strip().splitlines()[-1])["size_mib"])
        return ""

    async def create(self, principal: Principal, request: pb.CreateImageRequest) -> pb.CreateImageResponse:
        source = request.source
        if source.type in ("docker", "s3"):
            # 400, not 501: the SDK retries every 5xx, and this answer never changes
            raise InvalidArgument(
                f"source type {source.type!r} is not available on this platform (it reaches no image registry or bucket): "
                f'build from a recipe ({{"type": "recipe", "recipe": "{DEFAULT_IMAGE}"}}) or upload a tar of a root file '
                "system (POST /api/v1/images/upload)"
            )
        if source.type != "recipe":
            raise InvalidArgument(f'source.type must be "recipe" (or, elsewhere, "docker" or "s3"), not {source.type!r}')
        if source.recipe not in RECIPES:
            raise InvalidArgument(f"source.recipe must be one of: {', '.join(RECIPES)}; not {source.recipe!r}")
        room = request.size_mib if request.HasField("size_mib") else ROOM_MIB_DEFAULT
        if not 0 <= room <= ROOM_MIB_MAX:
            raise InvalidArgument(f"size_mib (room beyond the files) must be between 0 and {ROOM_MIB_MAX}, not {room}")
        description = request.description if request.HasField("description") else None
        validate_image_name(request.image_name)
        # The record counts the room until the build knows the files' size.
        row = await self.reserve(principal, request.image_name, room, "recipe", description)
        self.build(row, {"source": "recipe", "recipe": source.recipe, "size_mib": room})
        return pb.CreateImageResponse(image_name=row.image_name, job_id=row.job_id, status=row.status)

    async def upload(self, principal: Principal, messages: AsyncIterator[pb.UploadImageRequest]) -> pb.UploadImageResponse:
        """Check the name, size and the org's quota from the first message (a JSON body's once it is read,
        before its tar is stored), then store the tar and check every member's header (400 naming what is
        wrong), then build in the background."""
        first = await anext(messages, None)
        if first is None:
            raise InvalidArgument("an upload needs a body: a tar of a root file system")
        org = principal.org_id
        if self.uploading[org] >= ORG_UPLOADS_IN_FLIGHT:
            raise ResourceExhausted(
                f"organization {principal.org_label} is sending {ORG_UPLOADS_IN_FLIGHT} uploads already, the most at once: "
                "wait for one to end"
            )
        spool = Path(tempfile.mkdtemp(dir=self.root, prefix=".upload-"))
        self.uploading[org] += 1
        tarball = spool / "root.tar"
        row: ImageRow | None = None
        try:
            content_type, options = parse_options_header(first.body.content_type)
            if content_type.decode("latin-1") in JSON_TYPES:
                fields, tar = await self._receive_json(first, messages)
                row = await self.reserve(principal, *_upload_metadata(first, fields), "upload", _description(first, fields))
                tarball.write_bytes(tar)
            else:
                row = await self.reserve(principal, *_upload_metadata(first, {}), "upload", _description(first, {}))
                await self._receive(first, messages, tarball, content_type, options)
            try:
                await asyncio.to_thread(check_root, tarball, row.size_mib)
            except DiskError as refused:
                raise InvalidArgument(str(refused)) from None
        except BaseException:
            shutil.rmtree(spool, ignore_errors=True)
            if row is not None:
                await self._discard(row)
            raise
        finally:
            self.uploading[org] -= 1
            if not self.uploading[org]:
                del self.uploading[org]
        self.build(
            row, {"source": "upload", "tarball": str(tarball), "size_mib": row.size_mib}, lambda: shutil.rmtree(spool, ignore_errors=True)
        )
        return pb.UploadImageResponse(image_name=row.image_name, job_id=row.job_id, status=row.status)

    async def _discard(self, row: ImageRow) -> None:
        """Drop the record of an upload refused after its name was reserved."""
        async with self.db.write() as session:
            stored = await session.get(ImageRow, row.id)
            if stored is not None:
                await session.delete(stored)

    async def _receive(
        self,
        first: pb.UploadImageRequest,
        messages: AsyncIterator[pb.UploadImageRequest],
        tarball: Path,
        content_type: bytes,
        options: dict[bytes, bytes],
    ) -> None:
        """Write the upload's tar to `tarball` as it arrives, from a multipart/form-data body (field `file` or
        `tarball`) or the tar itself, at most VERS_IMAGE_MAX_UPLOAD_BYTES."""
        limit = self.settings.image_max_upload_bytes
        with tarball.open("wb") as out:
            sink = _Multipart(options.get(b"boundary", b""), out) if content_type == b"multipart/form-data" else None
            received = 0
            async for chunk in _chunks(first, messages):
                received += len(chunk)
                if received > limit:
                    raise ResourceExhausted(
                        f"the upload is larger than {limit} bytes (VERS_IMAGE_MAX_UPLOAD_BYTES): "
                        "upload a smaller root, or raise the setting"
                    )
                if sink is not None:
                    sink.write(chunk)
                else:
                    out.write(chunk)
            if sink is not None:
                sink.finish()
            elif not received:
                raise InvalidArgument("an upload needs a body: a tar of a root file system")

    async def _receive_json(
        self, first: pb.UploadImageRequest, messages: AsyncIterator[pb.UploadImageRequest]
    ) -> tuple[dict[str, Any], bytes]:
        """A JSON upload ({"tarball_b64": ...}, with the other fields in it), held in memory: at most
        VERS_HTTP_MAX_BODY_BYTES. Its other fields, and the tar."""
        limit = min(self.settings.image_max_upload_bytes, self.settings.http_max_body_bytes)
        held = bytearray()
        async for chunk in _chunks(first, messages):
            held += chunk
            if len(held) > limit:
                raise ResourceExhausted(
                    f"the upload is larger than {limit} bytes (VERS_HTTP_MAX_BODY_BYTES, a JSON upload): send the tar as "
                    "multipart/form-data or as the body itself, or raise the setting"
                )
        try:
            document = json.loads(held)
            tar = base64.b64decode(document["tarball_b64"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise InvalidArgument(
                'a JSON upload is {"image_name": ..., "size_mib": ..., "tarball_b64": "<the tar in base64>"}; '
                "or send multipart/form-data with the field 'file' or 'tarball'"
            ) from None
        return {k: v for k, v in document.items() if k in ("image_name", "size_mib", "description")}, tar

    async def delete(self, principal: Principal, base_image_id: str) -> pb.DeleteImageResponse:
        with contextlib.suppress(ValueError):
            uuid.UUID(base_image_id)
            async with self.db.write() as session:
                row = await session.get(ImageRow, base_image_id)
                if row is not None and row.org_id == principal.org_id:
                    if row.status == CREATING:
                        raise FailedPrecondition(
                            f"image {row.image_name!r} is still being built: delete it once its status is completed or failed"
                        )
                    disk = str(self.folder(row) / "rootfs.qcow2")
                    users = (await session.exec(select(func.count()).where(LayerRow.base_path == disk))).one()
                    if users:
                        raise Conflict(f"image {row.image_name!r} is in use by VMs (or commits made from them): delete them first")
                    await session.delete(row)
                    shutil.rmtree(self.folder(row), ignore_errors=True)
                    return pb.DeleteImageResponse(base_image_id=base_image_id, deleted=True)
        if any(info.base_image_id == base_image_id for info in self._builtins()):
            raise FailedPrecondition("that image is built with the platform (make images): it cannot be deleted through the API")
        raise NotFound(f"image {base_image_id} not found")


def _upload_metadata(first: pb.UploadImageRequest, fields: Mapping[str, Any]) -> tuple[str, int]:
    """An upload's image name and disk size (MiB), from the first message (the query string) or a JSON body's
    fields; InvalidArgument unless both are usable."""
    name = first.image_name or fields.get("image_name") or ""
    if not name:
        raise InvalidArgument("image_name is missing: give it in the query string (?image_name=NAME&size_mib=512)")
    if not isinstance(name, str):
        raise InvalidArgument(f"image_name must be a string, not {name!r}")
    size = first.size_mib or fields.get("size_mib") or UPLOAD_MIB_DEFAULT
    if isinstance(size, str) and size.isascii() and size.isdigit():
        size = int(size)
    if isinstance(size, bool) or not isinstance(size, int) or not UPLOAD_MIB_MIN <= size <= UPLOAD_MIB_MAX:
        raise InvalidArgument(
            f"size_mib (the disk's size) must be a whole number between {UPLOAD_MIB_MIN} and {UPLOAD_MIB_MAX}, not {size!r}"
        )
    return name, size


def _description(first: pb.UploadImageRequest, fields: Mapping[str, Any]) -> str | None:
    description = first.description or fields.get("description") or None
    if description is not None and not isinstance(description, str):
        raise InvalidArgument(f"description must be a string, not {description!r}")
    return description


def info_pb(row: ImageRow) -> pb.BaseImageInfo:
    info = pb.BaseImageInfo(
        base_image_id=row.id, image_name=row.image_name, owner_id=row.org_id, is_public=row.is_public, size_mib=row.size_mib,
        source_type=row.source_type, created_at=as_utc(row.created_at).isoformat(), status=row.status,
    )  # fmt: skip
    if row.description is not None:
        info.description = row.description
    return info


async def _chunks(first: pb.UploadImageRequest, messages: AsyncIterator[pb.UploadImageRequest]) -> AsyncIterator[bytes]:
    if first.body.data:
        yield first.body.data
    async for message in messages:
        if message.body.data:
            yield message.body.data


class _Multipart:
    """The file part (`file` or `tarball`) of a multipart/form-data body, written as it arrives."""

    def __init__(self, boundary: bytes, out: object) -> None:
        if not boundary:
            raise InvalidArgument("a multipart/form-data upload needs a boundary in its Content-Type")
        self.out = out
        self.header_name, self.header_value = b"", b""
        self.in_file = self.found = False
        self.parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._begin,
                "on_header_field": lambda data, start, end: self._header(field=data[start:end]),
                "on_header_value": lambda data, start, end: self._header(value=data[start:end]),
                "on_header_end": self._header_end,
                "on_part_data": self._data,
            },
        )

    def _begin(self) -> None:
        self.in_file = False
        self.header_name = self.header_value = b""

    def _header(self, field: bytes = b"", value: bytes = b"") -> None:
        self.header_name += field
        self.header_value += value

    def _header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            _kind, options = parse_options_header(self.header_value)
            self.in_file = options.get(b"name") in UPLOAD_FIELDS and not self.found
            self.found = self.found or self.in_file
        self.header_name = self.header_value = b""

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self.out.write(data[start:end])  # type: ignore[attr-defined]

    def write(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except Exception as error:  # python-multipart's parse errors have no common base
            raise InvalidArgument(f"the multipart/form-data body cannot be read: {error}") from None

    def finish(self) -> None:
        self.parser.finalize()
        if not self.found:
            raise InvalidArgument("No file field found in upload. Use field name 'file' or 'tarball'.")


class ImagesServicer(images_pb2_grpc.ImagesServiceServicer):
    def __init__(self, catalog: ImageCatalog) -> None:
        self.catalog = catalog

    async def ListImages(self, request: pb.ListImagesRequest, context: grpc.aio.ServicerContext) -> pb.ListImagesResponse:
        return await self.catalog.list_page(current_principal(), request.limit, request.offset)

    async def GetImageStatus(self, request: pb.GetImageStatusRequest, context: grpc.aio.ServicerContext) -> pb.GetImageStatusResponse:
        return await self.catalog.status(current_principal(), request.image_name)

    async def CreateImage(self, request: pb.CreateImageRequest, context: grpc.aio.ServicerContext) -> pb.CreateImageResponse:
        return await self.catalog.create(current_principal(), request)

    async def UploadImage(
        self, request_iterator: AsyncIterator[pb.UploadImageRequest], context: grpc.aio.ServicerContext
    ) -> pb.UploadImageResponse:
        return await self.catalog.upload(current_principal(), request_iterator)

    async def DeleteImage(self, request: pb.DeleteImageRequest, context: grpc.aio.ServicerContext) -> pb.DeleteImageResponse:
        return await self.catalog.delete(current_principal(), request.base_image_id)
