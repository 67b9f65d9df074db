"""Shared storage by URI: checkpoints, exported bridges and model folders on S3, GCS or a shared mount.

    fs, path = filesystem("s3://bucket/runs?endpoint_override=http://127.0.0.1:9000")   # pyarrow.fs
    check_storage("s3://bucket/runs", "storage_path", write=True)   # StorageError naming the problem and fix
    publish_folder("local/bridges", "s3://bucket/bridges/run1")     # atomic: MANIFEST.json is written last
    local = fetch_folder("s3://bucket/bridges/run1")                 # into this node's cache, keyed by content

A URI is ``s3://bucket/prefix``, ``gs://bucket/prefix`` or another scheme that ``pyarrow.fs`` knows; any
other string is a local path (a folder on this node, or a shared mount such as NFS at the same path on
every node). For S3-compatible stores (MinIO, Ceph, moto) the query names the endpoint:
``?endpoint_override=http://host:port`` (also ``region=...``, ``scheme=http``). Credentials never go in
the URI: they come from the standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, an IAM
instance profile, IRSA; for GCS the node's service account), so nothing secret is logged or pickled.
Connections time out after ``CONNECT_TIMEOUT_S`` and a request is tried ``MAX_ATTEMPTS`` times, so an
unreachable endpoint fails in seconds.

**The publishing rule (object stores have no rename).** ``publish_folder`` uploads the files under
``<uri>/<version>/`` where ``version`` is a hash of the files' contents, and then writes
``<uri>/MANIFEST.json`` (one object, one PUT: it appears whole or not at all) naming that version and
each file's size and sha256. Readers read the manifest first and only the version it names, so a
reader never sees a half-written folder: an interrupted publish leaves the previous manifest, and
the previous version's files, untouched. Older versions are deleted after the manifest has moved on,
except the one it replaced (a reader may still be downloading it). A folder without a manifest (a
model folder copied with ``aws s3 sync``) is read as it is, keyed by its listing (names, sizes, times).

The cache (``fetch_folder``) lives under ``$CALM_RAY_CACHE`` (default ``~/.cache/calm-ray/storage``),
one folder per URI and content key; a changed remote gets a new key and is fetched again. A folder is
downloaded to a temporary name and renamed into place, so a half-downloaded copy is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from composition.checkpoint import file_sha256

MANIFEST = "MANIFEST.json"
FORMAT = "calm-ray-folder"
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 3
S3_QUERY_KEYS = ("endpoint_override", "region", "scheme")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class StorageError(ValueError):
    """Storage that cannot be used as configured; the message names the location, the problem and the fix."""


def is_uri(path: str | os.PathLike | None) -> bool:
    """True for ``s3://...``, ``gs://...`` and other schemes; False for local paths (and ``file://``)."""
    return isinstance(path, str) and bool(_SCHEME.match(path)) and not path.startswith("file://")


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended to its path, its query kept: join("s3://b/r?x=1", "n") -> "s3://b/r/n?x=1"."""
    if not is_uri(uri):
        return str(Path(uri, *parts))
    split = urlsplit(uri)
    path = "/".join([split.path.rstrip("/"), *[p.strip("/") for p in parts]])
    return f"{split.scheme}://{split.netloc}{path}" + (f"?{split.query}" if split.query else "")


def redact(uri: str) -> str:
    """The URI without its query (for messages: endpoints are not secret, but keep lines short)."""
    return uri.split("?", 1)[0] if is_uri(uri) else uri


def filesystem(uri: str):
    """``(pyarrow FileSystem, path inside it)`` for a URI or local path.

    S3 gets explicit timeouts and retries (an unreachable endpoint fails in seconds) and, without
    ``endpoint_override`` or ``region``, the bucket's own region. Raises StorageError for a URI that
    carries credentials, an unknown query key, or a scheme pyarrow cannot open.
    """
    import pyarrow.fs as pafs

    if not is_uri(uri):
        local = str(uri).removeprefix("file://")
        return pafs.LocalFileSystem(), str(Path(os.path.expanduser(local)).absolute())
    split = urlsplit(uri)
    if "@" in split.netloc:
        raise StorageError(
            f"{redact(uri).split('@')[-1]}: the URI carries credentials (user:secret@); remove them and give them "
            f"through the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), an IAM instance profile or IRSA")
    if split.scheme == "s3":
        query = dict(parse_qsl(split.query))
        unknown = sorted(set(query) - set(S3_QUERY_KEYS))
        if unknown:
            raise StorageError(f"{redact(uri)}: unknown query key(s) {', '.join(unknown)}; an s3:// URI takes "
                               f"{', '.join(S3_QUERY_KEYS)} (e.g. ?endpoint_override=http://host:9000)")
        if not split.netloc:
            raise StorageError(f"{uri}: no bucket; write s3://<bucket>/<prefix>")
        return _s3(split.netloc, tuple(sorted(query.items()))), f"{split.netloc}{split.path}".rstrip("/")
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError / ImportError
        raise StorageError(f"{redact(uri)}: pyarrow cannot open this URI ({_first_line(e)}); use s3://, gs:// or "
                           f"a folder path (a shared mount on a cluster)") from None


_S3_CACHE: dict = {}


def _s3(bucket: str, query: tuple):
    import pyarrow.fs as pafs

    key = (bucket, query)
    if key not in _S3_CACHE:
        options = dict(query)
        endpoint = options.pop("endpoint_override", None)
        scheme = options.pop("scheme", None)
        if endpoint and "://" in endpoint:
            scheme = scheme or endpoint.split("://", 1)[0]
            endpoint = endpoint.split("://", 1)[1]
        region = options.pop("region", None)
        if region is None and endpoint is None:
            try:  # the bucket's own region (a request to a wrong region is refused)
                region = pafs.resolve_s3_region(bucket)
            except OSError:
                region = None  # missing bucket or no access: check_storage says which
        kwargs = {"connect_timeout": CONNECT_TIMEOUT_S, "request_timeout": REQUEST_TIMEOUT_S,
                  "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS)}
        if endpoint:
            kwargs["endpoint_override"] = endpoint
        if scheme:
            kwargs["scheme"] = scheme
        if region:
            kwargs["region"] = region
        _S3_CACHE[key] = pafs.S3FileSystem(**kwargs)
    return _S3_CACHE[key]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def explain(uri: str, key: str, e: BaseException) -> StorageError:
    """A StorageError naming ``key``, the location, what went wrong and what to do."""
    where = f"'{key}' ({redact(uri)})"
    text = str(e)
    if any(s in text for s in ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH",
                               "AccessDenied", "InvalidAccessKeyId", "403", "No credentials", "Unauthorized")):
        return StorageError(f"{where}: access denied with the credentials this process has ({_first_line(e)}); "
                            f"set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the node's IAM role / IRSA) to "
                            f"credentials that may read and write the bucket")
    if any(s in text for s in ("NETWORK_CONNECTION", "curlCode", "Could not connect", "Connection refused",
                               "timed out", "Timeout", "Couldn't resolve", "Could not resolve")):
        return StorageError(f"{where}: the storage endpoint cannot be reached ({_first_line(e)}); check "
                            f"endpoint_override in the URI and that this machine can reach it")
    if "NoSuchBucket" in text or "not found" in text.lower() and "bucket" in text.lower():
        return _no_bucket(uri, key)
    return StorageError(f"{where}: {_first_line(e)}")


def _no_bucket(uri: str, key: str) -> StorageError:
    bucket = urlsplit(uri).netloc
    return StorageError(f"'{key}' ({redact(uri)}): the bucket {bucket!r} does not exist; create it first (e.g. "
                        f"`aws s3 mb s3://{bucket}`) or fix the bucket name")


def check_storage(uri: str, key: str, write: bool = True) -> None:
    """Check, before any work, that ``uri`` can be used: reachable, bucket present, credentials valid, and
    (``write``) writable, by writing and deleting one small object beside what is there. Nothing that
    exists is changed. Local paths: the folder (or its nearest existing parent) must be writable."""
    import pyarrow.fs as pafs

    if not is_uri(uri):
        if write:
            path = Path(filesystem(uri)[1])
            parent = next(p for p in [path, *path.parents] if p.exists())
            if not os.access(parent, os.W_OK):
                raise StorageError(f"'{key}' ({uri}): {parent} is not writable; choose a folder you can write")
        return
    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket) if isinstance(fs, pafs.S3FileSystem) else None
        if info is not None and info.type == pafs.FileType.NotFound:
            raise _no_bucket(uri, key)
        if write:
            probe = f"{path}/.calm-ray-write-check-{os.getpid()}-{time.time_ns()}"
            with fs.open_output_stream(probe) as f:
                f.write(b"calm-ray write check\n")
            fs.delete_file(probe)
        else:
            fs.get_file_info(path)
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow's OSError carries the AWS error name
        raise explain(uri, key, e) from None


# ------------------------------------------------------------------------------------------ publishing
def publish_folder(local: str | os.PathLike, uri: str) -> str:
    """Upload the files of ``local`` (one level, no subfolders) to ``uri`` atomically; returns the version.

    The files go to ``<uri>/<version>/``, then ``<uri>/MANIFEST.json`` is written last (see the module
    docstring). Publishing the same contents again only rewrites the manifest.
    """
    fs, root = filesystem(uri)
    files = sorted(p for p in Path(local).iterdir() if p.is_file())
    if not files:
        raise StorageError(f"{local}: nothing to publish (no files)")
    entries = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    version = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:16]
    previous = read_manifest(uri)
    fs.create_dir(f"{root}/{version}")
    for p in files:
        with open(p, "rb") as src, fs.open_output_stream(f"{root}/{version}/{p.name}") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
    manifest = {"format": FORMAT, "version": version, "files": entries, "published_unix": time.time()}
    with fs.open_output_stream(f"{root}/{MANIFEST}") as f:  # the commit point
        f.write((json.dumps(manifest, indent=2) + "\n").encode())
    keep = {version, (previous or {}).get("version")}
    _delete_versions(fs, root, keep)
    return version


def _delete_versions(fs, root: str, keep: set) -> None:
    import pyarrow.fs as pafs

    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        name = info.base_name
        if info.type == pafs.FileType.Directory and re.fullmatch(r"[0-9a-f]{16}", name) and name not in keep:
            try:
                fs.delete_dir(info.path)
            except OSError:
                pass  # best effort: an old version left behind costs space, not correctness


def read_manifest(uri: str) -> dict | None:
    """The folder's manifest, or None when it has none (a folder copied without ``publish_folder``)."""
    import pyarrow.fs as pafs

    fs, root = filesystem(uri)
    if fs.get_file_info(f"{root}/{MANIFEST}").type != pafs.FileType.File:
        return None
    with fs.open_input_stream(f"{root}/{MANIFEST}") as f:
        manifest = json.loads(f.read().decode())
    if manifest.get("format") != FORMAT:
        raise StorageError(f"{redact(uri)}/{MANIFEST} is not a calm-ray manifest (format {manifest.get('format')!r})")
    return manifest


def _remote_files(uri: str) -> tuple[str, dict[str, str], dict | None]:
    """(content key, {relative name: path in the filesystem}, manifest or None) of a remote folder."""
    import pyarrow.fs as pafs

    fs, root = filesystem(uri)
    manifest = read_manifest(uri)
    if manifest is not None:
        return manifest["version"], {n: f"{root}/{manifest['version']}/{n}" for n in manifest["files"]}, manifest
    infos = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
             if i.type == pafs.FileType.File]
    if not infos:
        raise StorageError(f"{redact(uri)}: no files there; publish the folder first (a training job's `output`, "
                           f"or copy a model folder there)")
    listing = sorted((i.path[len(root) + 1:], i.size, i.mtime_ns or 0) for i in infos)
    key = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    return key, {name: f"{root}/{name}" for name, _, _ in listing}, None


def cache_root() -> Path:
    return Path(os.environ.get("CALM_RAY_CACHE") or Path.home() / ".cache" / "calm-ray" / "storage")


def fetch_folder(uri: str, key: str = "path", cache: str | os.PathLike | None = None) -> Path:
    """A local copy of the remote folder ``uri`` (this node's cache; fetched again when the remote changed).

    Local paths are returned as they are. Files listed in a manifest are checked against its sizes and
    sha256; a mismatch fails (StorageError) rather than serving other bytes.
    """
    if not is_uri(uri):
        return Path(uri)
    try:
        version, files, manifest = _remote_files(uri)
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise explain(uri, key, e) from None
    base = Path(cache or cache_root()) / hashlib.sha256(uri.encode()).hexdigest()[:12]
    target = base / version
    if target.is_dir():
        return target
    base.mkdir(parents=True, exist_ok=True)
    fs, _ = filesystem(uri)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=base))
    try:
        for name, path in files.items():
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(path) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 8 << 20)
            if manifest is not None:
                want = manifest["files"][name]
                if dest.stat().st_size != want["size"] or file_sha256(dest) != want["sha256"]:
                    raise StorageError(f"{redact(uri)}: {name} does not match its manifest (size or sha256); "
                                       f"publish the folder again")
        try:
            os.rename(tmp, target)  # fails if another process got there first: then use theirs
        except OSError:
            if not target.is_dir():
                raise
        (base / "LATEST").write_text(version + "\n")
        _prune(base, keep={version})
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise explain(uri, key, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _prune(base: Path, keep: set, max_versions: int = 2) -> None:
    """Keep the newest ``max_versions`` cached versions of one URI (replicas may still read an older one)."""
    versions = sorted((p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in versions if p.name not in keep][max(0, max_versions - len(keep)):]:
        shutil.rmtree(old, ignore_errors=True)


def read_member(uri: str, name: str, key: str = "path") -> bytes:
    """One file of a (remote or local) folder, through its manifest when it has one (e.g. a model's config.json)."""
    if not is_uri(uri):
        return (Path(uri) / name).read_bytes()
    try:
        _, files, _ = _remote_files(uri)
        if name not in files:
            raise StorageError(f"'{key}' ({redact(uri)}) has no {name}; give a Hugging Face model folder")
        fs, _ = filesystem(uri)
        with fs.open_input_stream(files[name]) as f:
            return f.read()
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise explain(uri, key, e) from None


def check_folder(uri: str, key: str, needs: tuple[str, ...] = ()) -> None:
    """Check before any work that the remote folder can be read and holds ``needs`` (StorageError otherwise)."""
    if not is_uri(uri):
        return
    check_storage(uri, key, write=False)  # bucket, credentials, endpoint: each with its own sentence
    try:
        _, files, _ = _remote_files(uri)
    except StorageError as e:
        raise StorageError(f"'{key}': {e}") from None
    except Exception as e:  # noqa: BLE001
        raise explain(uri, key, e) from None
    missing = [n for n in needs if n not in files]
    if missing:
        raise StorageError(f"'{key}' ({redact(uri)}) has no {', '.join(missing)}; point it at a folder that holds them")


def with_query(uri: str, **query: str) -> str:
    """``uri`` with query keys added (tests and docs: ``with_query("s3://b/p", endpoint_override=...)``)."""
    split = urlsplit(uri)
    merged = {**dict(parse_qsl(split.query)), **query}
    return f"{split.scheme}://{split.netloc}{split.path}?{urlencode(merged, safe=':/')}"
