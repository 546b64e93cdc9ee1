"""A release on S3: the model files, then a manifest naming them by sha256, written LAST.

Layout: s3://<bucket>/<prefix>/<pipeline>/<release_id>/{<files>, manifest.json}. The release id is
derived from the files' hashes, so the same bytes always land at the same keys (idempotent), and
a folder without manifest.json is an interrupted upload, never a release.
"""
from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from barkgpt.errors import BarkError
from barkgpt.fileio import atomic_path, sha256_file

MANIFEST = "manifest.json"
MIB = 1024 * 1024


class ReleaseRefused(BarkError):
    """The release cannot be served as it is (the function refuses it for its whole life)."""


class ChecksumMismatch(ReleaseRefused):
    """A file's bytes do not match the sha256 the manifest promises."""


def plain_name(name) -> bool:
    """A bare file name: joined to a folder, it names a file inside that folder and nowhere else."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and Path(name).name == name)


@dataclass(frozen=True)
class TransferSettings:
    multipart_threshold: int = 64 * MIB
    multipart_chunksize: int = 16 * MIB
    max_concurrency: int = 4
    attempts: int = 3
    backoff_s: float = 0.5

    def boto_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.multipart_threshold,
                              multipart_chunksize=self.multipart_chunksize,
                              max_concurrency=self.max_concurrency)

    def part_size(self, size: int) -> int | None:
        """The part size s3transfer will use for a file of `size` bytes; None = single PUT."""
        if size < self.multipart_threshold:
            return None
        from s3transfer.utils import ChunksizeAdjuster

        return ChunksizeAdjuster().adjust_chunksize(self.multipart_chunksize, size)


# --- manifest ----------------------------------------------------------------------------------

def describe_files(files: dict[str, Path]) -> dict[str, dict]:
    """{role: path} -> {role: {name, sha256, size}}; every file must exist."""
    out = {}
    for role, path in files.items():
        path = Path(path)
        if not path.is_file():
            raise BarkError(f"{path}: the release needs this {role} file; run the pipeline up to export first")
        out[role] = {"name": path.name, "sha256": sha256_file(path), "size": path.stat().st_size}
    names = [f["name"] for f in out.values()]
    if len(set(names)) != len(names):
        raise BarkError(f"release files must have distinct names; got {names}")
    return out


def release_id(files: dict[str, dict]) -> str:
    """Content address of a release: hash of the (role, name, sha256) triples."""
    triples = sorted((role, f["name"], f["sha256"]) for role, f in files.items())
    return hashlib.sha256(json.dumps(triples).encode()).hexdigest()[:16]


def build_manifest(files: dict[str, Path], *, pipeline: str, backend: str, bucket: str, prefix: str,
                   provenance: dict | None = None) -> dict:
    described = describe_files(files)
    rid = release_id(described)
    base = release_prefix(prefix, pipeline, rid)
    for f in described.values():
        f["key"] = f"{base}/{f['name']}"
    return {
        "format": 1,
        "pipeline": pipeline,
        "backend": backend,
        "release_id": rid,
        "bucket": bucket,
        "prefix": base,
        "files": described,
        "provenance": provenance or {},
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def release_prefix(prefix: str, pipeline: str, rid: str) -> str:
    return "/".join(p for p in (prefix.strip("/"), pipeline, rid) if p)


def manifest_key(manifest: dict) -> str:
    return f"{manifest['prefix']}/{MANIFEST}"


def manifest_uri(manifest: dict) -> str:
    return f"s3://{manifest['bucket']}/{manifest_key(manifest)}"


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise BarkError(f"{uri!r} is not an s3://bucket/key URI")
    bucket, key = uri[5:].split("/", 1)
    return bucket, key


# --- upload ------------------------------------------------------------------------------------

def ensure_bucket(s3, bucket: str, region: str) -> None:
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket)
        return
    except ClientError as err:
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 403:
            raise BarkError(f"bucket {bucket!r} exists but these credentials may not use it; "
                            "choose another deploy.bucket or grant s3:ListBucket/PutObject") from None
        if status != 404:
            raise
    kwargs = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    s3.create_bucket(Bucket=bucket, **kwargs)
    s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration={
        "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True})


def read_manifest(s3, bucket: str, key: str) -> tuple[dict | None, bytes]:
    """(manifest, its bytes) or (None, b"") when there is no manifest at `key`."""
    from botocore.exceptions import ClientError

    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None, b""
        raise
    return json.loads(body), body


def upload_release(s3, manifest: dict, files: dict[str, Path], transfer: TransferSettings,
                   log=print) -> dict:
    """Upload every file (retried, verified), then the manifest. Returns what happened.

    If the same release (same file hashes) already has a manifest, nothing is uploaded.
    """
    bucket, key = manifest["bucket"], manifest_key(manifest)
    existing, existing_body = read_manifest(s3, bucket, key)
    if existing is not None and existing.get("files") == manifest["files"]:
        log(f"release {manifest['release_id']} already on s3://{bucket}/{key}; nothing uploaded")
        return {"status": "unchanged", "manifest": existing, "manifest_uri": f"s3://{bucket}/{key}",
                "manifest_sha256": hashlib.sha256(existing_body).hexdigest(), "uploaded": []}
    uploaded = []
    # Largest first: the expensive part fails early, before small files are spent on.
    for role, entry in sorted(manifest["files"].items(), key=lambda kv: -kv[1]["size"]):
        seconds = upload_verified(s3, Path(files[role]), bucket, entry, transfer, log)
        uploaded.append({"role": role, "key": entry["key"], "size": entry["size"], "seconds": seconds})
    # The manifest goes last: only now is this folder a release.
    body = manifest_bytes(manifest)
    s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json",
                  ChecksumAlgorithm="SHA256", Metadata={"sha256": hashlib.sha256(body).hexdigest()})
    log(f"wrote manifest s3://{bucket}/{key}")
    return {"status": "uploaded", "manifest": manifest, "manifest_uri": f"s3://{bucket}/{key}",
            "manifest_sha256": hashlib.sha256(body).hexdigest(), "uploaded": uploaded}


def upload_verified(s3, path: Path, bucket: str, entry: dict, transfer: TransferSettings, log=print) -> float:
    """Upload one file with retries; each attempt is checked against the file's sha256."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    key, last = entry["key"], None
    for attempt in range(1, transfer.attempts + 1):
        started = time.perf_counter()
        try:
            s3.upload_file(str(path), bucket, key, Config=transfer.boto_config(), ExtraArgs={
                "ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": entry["sha256"]}})
            verify_object(s3, bucket, entry, transfer, path)
            seconds = time.perf_counter() - started
            log(f"uploaded {path.name} ({entry['size']:,} bytes) in {seconds:.2f}s")
            return seconds
        except (S3UploadFailedError, BotoCoreError, ClientError, ChecksumMismatch) as err:
            last = err
            log(f"upload of {path.name} failed (attempt {attempt}/{transfer.attempts}): {err}")
            abort_incomplete(s3, bucket, key)
            if attempt < transfer.attempts:
                time.sleep(transfer.backoff_s * 2 ** (attempt - 1))
    raise BarkError(f"uploading {path} to s3://{bucket}/{key} failed after {transfer.attempts} attempts "
                    f"({last}); no manifest was written, so this is not a release; re-run the deploy")


def abort_incomplete(s3, bucket: str, key: str) -> None:
    """Abort multipart uploads left for `key` (s3transfer aborts on failure; this is the backstop)."""
    try:
        pending = s3.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
        for up in pending:
            if up["Key"] == key:
                s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"])
    except Exception:  # best effort: a leftover part costs storage, never correctness
        pass


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def expected_s3_sha256(path_or_bytes, size: int, part_size: int | None) -> str:
    """What S3 reports as ChecksumSHA256: the object's sha256, or for multipart uploads the sha256
    of the parts' sha256 digests (a "composite" checksum)."""
    with open(path_or_bytes, "rb") as f:
        if part_size is None:
            digest = hashlib.sha256()
            while block := f.read(MIB):
                digest.update(block)
            return _b64(digest.digest())
        parts = b""
        while block := f.read(part_size):
            parts += hashlib.sha256(block).digest()
        return _b64(hashlib.sha256(parts).digest())


def verify_object(s3, bucket: str, entry: dict, transfer: TransferSettings, path: Path | None = None) -> str:
    """Check the stored object against the manifest entry; returns how it was checked.

    S3's own SHA256 checksum is compared when present (for multipart: composite, computed locally
    from the same part size); otherwise the object is read back and hashed.
    """
    head = s3.head_object(Bucket=bucket, Key=entry["key"], ChecksumMode="ENABLED")
    where = f"s3://{bucket}/{entry['key']}"
    if head["ContentLength"] != entry["size"]:
        raise ChecksumMismatch(f"{where}: size {head['ContentLength']} != {entry['size']}")
    if head.get("Metadata", {}).get("sha256") not in (None, entry["sha256"]):
        raise ChecksumMismatch(f"{where}: metadata sha256 differs from the manifest")
    stored = head.get("ChecksumSHA256")
    if stored:
        stored = stored.split("-")[0]  # AWS appends -<parts> to composite checksums
        part = transfer.part_size(entry["size"])
        if part is None and stored == _b64(bytes.fromhex(entry["sha256"])):
            return "s3-checksum"
        if part is not None and path is not None and stored == expected_s3_sha256(path, entry["size"], part):
            return "s3-composite-checksum"
    # No (comparable) checksum from the server: read the object back and hash it.
    digest = hashlib.sha256()
    for block in s3.get_object(Bucket=bucket, Key=entry["key"])["Body"].iter_chunks(MIB):
        digest.update(block)
    if digest.hexdigest() != entry["sha256"]:
        raise ChecksumMismatch(f"{where}: stored bytes hash to {digest.hexdigest()[:12]}..., "
                               f"expected {entry['sha256'][:12]}...")
    return "read-back"


# --- download ----------------------------------------------------------------------------------

def download_verified(s3, bucket: str, entry: dict, dest_dir: Path) -> Path:
    """Fetch one manifest file into dest_dir; ChecksumMismatch if its sha256 differs."""
    if not plain_name(entry.get("name")):
        raise ReleaseRefused(f"manifest file name {entry.get('name')!r} is not a plain file name; refusing to "
                             f"write outside {dest_dir}; re-run the deploy to write a fresh manifest")
    dest = Path(dest_dir) / entry["name"]
    if dest.exists() and dest.stat().st_size == entry["size"] and sha256_file(dest) == entry["sha256"]:
        return dest  # already here and intact (e.g. a warm container's /tmp)
    with atomic_path(dest) as tmp:
        s3.download_file(bucket, entry["key"], str(tmp))
        actual = sha256_file(tmp)
        if actual != entry["sha256"]:
            raise ChecksumMismatch(
                f"s3://{bucket}/{entry['key']}: downloaded bytes hash to sha256 {actual[:12]}..., but the "
                f"manifest says {entry['sha256'][:12]}...; the object was modified or corrupted after "
                "release; re-run the deploy to upload a fresh release")
    return dest
