"""Files on a datastore: upload over the server's /folder HTTP interface, list, delete.

Uploads stream the local file with the session's cookie (the password is not sent again);
directories and deletions go through the FileManager API so they work on vCenter and ESXi alike.
"""

from __future__ import annotations

import http.client
import os
import ssl
import urllib.parse
from typing import Any

from bonneville.backends.vsphere.connection import wait_task
from bonneville.backends.vsphere.vmomi import vmomi
from bonneville.spec.errors import BackendError

CHUNK = 1 << 20


def ds_path(datastore: str, path: str) -> str:
    """'[datastore] path'."""
    return f"[{datastore}] {path}".rstrip()


class Datastore:
    """One datastore of one datacenter, through a connected ServiceInstance."""

    def __init__(
        self, si: Any, datacenter: Any, datastore: Any, base_url: str, ssl_context: Any
    ) -> None:
        self.si = si
        self.base_url = base_url
        self.dc = datacenter
        self.ds = datastore
        self.name: str = datastore.name
        self.ssl_context = ssl_context

    def exists(self, path: str) -> int | None:
        """Size of the file at ``path`` (relative to the datastore root), None if absent."""
        vim = vmomi().vim

        directory, _, name = path.rpartition("/")
        spec = vim.host.DatastoreBrowser.SearchSpec(
            matchPattern=[name], details=vim.host.DatastoreBrowser.FileInfo.Details(fileSize=True)
        )
        try:
            result = wait_task(
                self.ds.browser.SearchDatastore_Task(ds_path(self.name, directory), spec),
                f"listing {ds_path(self.name, directory)}",
            )
        except BackendError as exc:
            if isinstance(exc.__cause__, vim.fault.FileNotFound):
                return None
            raise
        for info in result.file or []:
            if info.path == name:
                return int(info.fileSize or 0)
        return None

    def listing(self, directory: str) -> list[str]:
        """Every file and folder below ``directory``, relative to the datastore root."""
        vim = vmomi().vim

        spec = vim.host.DatastoreBrowser.SearchSpec(matchPattern=["*"])
        try:
            results = wait_task(
                self.ds.browser.SearchDatastoreSubFolders_Task(ds_path(self.name, directory), spec),
                f"listing {ds_path(self.name, directory)}",
            )
        except BackendError as exc:
            if isinstance(exc.__cause__, vim.fault.FileNotFound):
                return []
            raise
        found = []
        for result in results or []:
            for info in result.file or []:
                folder = str(result.folderPath).split("]", 1)[-1].strip().strip("/")
                found.append(f"{folder}/{info.path}" if folder else str(info.path))
        return sorted(found)

    def mkdir(self, path: str) -> None:
        vim = vmomi().vim

        try:
            self.si.content.fileManager.MakeDirectory(
                name=ds_path(self.name, path), datacenter=self.dc, createParentDirectories=True
            )
        except vim.fault.FileAlreadyExists:
            pass
        except vim.fault.VimFault as exc:
            raise BackendError(f"cannot make {ds_path(self.name, path)}: {exc.msg}") from exc

    def delete(self, path: str) -> None:
        """Delete a file or a directory tree; an absent one is not an error."""
        vim = vmomi().vim

        try:
            task = self.si.content.fileManager.DeleteDatastoreFile_Task(
                name=ds_path(self.name, path), datacenter=self.dc
            )
            wait_task(task, f"deleting {ds_path(self.name, path)}")
        except BackendError as exc:
            if isinstance(exc.__cause__, vim.fault.FileNotFound):
                return
            raise
        except vim.fault.FileNotFound:
            return

    def upload(self, local: str, path: str) -> None:
        """PUT ``local`` to ``path`` (relative to the datastore root)."""
        parts = urllib.parse.urlsplit(self.base_url)
        host, port, scheme = parts.hostname or "", parts.port, parts.scheme
        cookie = self.si._stub.cookie.split(";", 1)[0]
        query = urllib.parse.urlencode({"dcPath": self.dc.name, "dsName": self.name})
        target = f"/folder/{urllib.parse.quote(path)}?{query}"
        size = os.path.getsize(local)
        conn: http.client.HTTPConnection
        if scheme == "https":
            context = self.ssl_context or ssl.create_default_context()
            conn = http.client.HTTPSConnection(host, port, context=context, timeout=300)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=300)
        try:
            conn.putrequest("PUT", target)
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(size))
            conn.putheader("Cookie", cookie)
            conn.endheaders()
            with open(local, "rb") as f:
                while chunk := f.read(CHUNK):
                    conn.send(chunk)
            response = conn.getresponse()
            body = response.read(512)
        except OSError as exc:
            raise BackendError(f"uploading {local} to {ds_path(self.name, path)}: {exc}") from exc
        finally:
            conn.close()
        if response.status not in (200, 201, 204):
            raise BackendError(
                f"uploading {local} to {ds_path(self.name, path)}: HTTP {response.status} "
                f"{response.reason} {body[:200]!r}"
            )
