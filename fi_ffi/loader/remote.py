"""A remote wheel's member listing without downloading the wheel: HTTP range requests for its zip central directory.

A wheel is a zip, whose table of contents (the central directory, with each member's name, size and CRC-32) sits at
the end of the file: ``fi-ffi list`` needs only that, a few hundred KB of a 1-2 GB wheel. :func:`zip_listing` reads
it through a file object whose reads are HTTP ``Range`` requests (usually three or four: the tail holding the
end-of-central-directory record, the central directory itself), and lets :mod:`zipfile` parse it (ZIP64 included).

The listing is not verified against the lock's sha256 (that needs the whole file), so it serves listings only
(:func:`fi_ffi.loader.modules.wheel_index` under :func:`listing_without_download`) and is never recorded in the
cache: loading a module still fetches and verifies the wheel. A server that ignores ``Range`` (answers ``200``
with the whole body) makes :func:`zip_listing` give up after the first response's headers, saying why and how big
the wheel is (:class:`NoRanges`); a server that cannot be reached at all fails at once (:class:`Unreachable`).
"""

from __future__ import annotations

import io
import re
from typing import Any

from ..errors import FetchError

TAIL = 64 * 1024 + 22  # the end-of-central-directory record is within the last 22 bytes + a comment of < 64 KiB
TIMEOUT_S = 30.0


class RemoteError(FetchError):
    """A range request failed; ``size``: the wheel's size in bytes where a response told it (else ``None``)."""

    def __init__(self, message: str, size: int | None = None) -> None:
        super().__init__(message)
        self.size = size


class NoRanges(RemoteError):
    """The server does not serve byte ranges: only a whole download would list the wheel."""


class Unreachable(RemoteError):
    """The server could not be reached at all (no network, a name that does not resolve, a refused connection)."""


def unreachable(exc: BaseException) -> str | None:
    """Why ``exc`` (an error of opening a URL) means the host cannot be reached at all, or ``None`` when it is
    another fault (a timeout, an HTTP status, a connection cut midway: those may pass on a retry).

    No network shows as a name that does not resolve (``socket.gaierror``), an unreachable network or host, or a
    refused connection; retrying those over seconds only delays the one line that says so.
    """
    import errno
    import socket

    reason = getattr(exc, "reason", exc)
    if isinstance(reason, socket.gaierror):
        return f"the host name does not resolve ({reason.strerror or reason})"
    if isinstance(reason, ConnectionRefusedError):
        return "the connection was refused"
    if isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN):
        return f"the network is unreachable ({reason.strerror or reason})"
    return None


class RangeFile(io.RawIOBase):
    """A read-only, seekable view of the file at ``url`` whose reads are HTTP range requests.

    ``opener``: a urllib opener (proxies, CA bundle); ``headers``: sent with each request. The first request
    fetches the last :data:`TAIL` bytes (which also tells the size); later reads are served from that block when
    they fall inside it. ``requests`` counts the requests made.
    """

    def __init__(self, url: str, opener: Any, headers: dict[str, str]) -> None:
        super().__init__()
        self.url = url
        self._opener = opener
        self._headers = headers
        self._pos = 0
        self.requests = 0
        first, start, self.size = self._get(f"bytes=-{TAIL}")
        self._block = (start, first)

    def _get(self, spec: str) -> tuple[bytes, int, int]:
        """One range request: (body, its first byte's offset, the file's size)."""
        import urllib.error
        import urllib.parse
        import urllib.request

        self.requests += 1
        request = urllib.request.Request(self.url, headers={**self._headers, "Range": spec})
        try:
            response = self._opener.open(request, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            raise RemoteError(f"{self.url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            why = unreachable(exc)
            if why is not None:
                raise Unreachable(f"cannot reach {urllib.parse.urlsplit(self.url).netloc}: {why}") from None
            raise RemoteError(f"{self.url}: {getattr(exc, 'reason', exc)}") from None
        with response:
            if response.status != 206:  # the whole body follows: stop before reading it (its length is the size)
                length = response.headers.get("Content-Length", "")
                raise NoRanges(
                    f"{self.url} does not serve byte ranges (HTTP {response.status} to a Range request)",
                    int(length) if length.isdigit() else None,
                )
            match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", response.headers.get("Content-Range", "").strip())
            if match is None:
                raise NoRanges(f"{self.url}: a byte range came without a usable Content-Range header")
            self.url = response.geturl()  # later requests skip the redirects
            start, end, size = (int(g) for g in match.groups())
            body = response.read(end - start + 1)
        if len(body) != end - start + 1:
            raise RemoteError(
                f"{self.url}: the range {spec} was cut short ({len(body)} of {end - start + 1} bytes)", size
            )
        return body, start, size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self._pos + n)
        if end <= self._pos:
            return b""
        start, block = self._block
        if not (start <= self._pos and end <= start + len(block)):
            body, got, _ = self._get(f"bytes={self._pos}-{end - 1}")
            self._block = (start, block) = (got, body)
        out = block[self._pos - start : end - start]
        self._pos = end
        return out

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def zip_listing(url: str, opener: Any, headers: dict[str, str]) -> tuple[dict[str, list[int]], int, int]:
    """The ``.so`` members of the zip at ``url`` ({member: [size, crc32]}), the file's size and the number of
    requests made, from its central directory alone.

    Raises:
        Unreachable: the server could not be reached (no network).
        NoRanges: the server does not serve byte ranges.
        RemoteError: a request failed, or what came back is not a zip's end; its ``size`` is the wheel's where a
            response told it.
    """
    import zipfile

    remote = RangeFile(url, opener, headers)
    try:
        with zipfile.ZipFile(remote) as zf:  # reads the end record and the central directory, no member data
            members = {i.filename: [i.file_size, i.CRC] for i in zf.infolist() if i.filename.endswith(".so")}
    except (zipfile.BadZipFile, EOFError) as exc:
        raise RemoteError(f"{url}: its end is not a zip's central directory ({exc})", remote.size) from None
    except RemoteError as exc:
        exc.size = exc.size if exc.size is not None else remote.size
        raise
    return members, remote.size, remote.requests
