"""Object storage access: the one place that builds S3 clients.

Everything that touches S3 (data shards, latent caches, checkpoints, served latents) gets
its pyarrow filesystem or boto3 client from here, configured from the standard AWS
environment that ``icd stack env`` exports (and that KubeRay pods get from a Secret):

    AWS_ENDPOINT_URL (or MLFLOW_S3_ENDPOINT_URL), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_REGION / AWS_DEFAULT_REGION, ICD_BUCKET, AWS_MAX_ATTEMPTS.

Credentials are read from the environment only, never from a config file.

Every client retries with the AWS SDKs' standard strategy (exponential backoff, capped at 20 s)
up to ``AWS_MAX_ATTEMPTS`` times, default 10: about 80 s of retrying, so object storage can be
away for a minute (a restart, a failover) without failing a checkpoint write. Ray Train's
controller writes its checkpoint index through this filesystem and does not retry a failed write
itself: with the SDK default of 3 attempts (2 s), a 30 s outage ended the stage.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlparse

from pyarrow import fs as pafs

DEFAULT_REGION = "us-east-1"
DEFAULT_MAX_ATTEMPTS = 10


class StorageError(RuntimeError):
    """Object storage is misconfigured or refused a request; the message says how to fix it."""


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None  # None = AWS itself
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    region: str = DEFAULT_REGION
    bucket: str | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # per request, with exponential backoff (see the module doc)

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        bucket: str | None = None,
        endpoint_url: str | None = None,
    ) -> "S3Settings":
        """Read the AWS_* environment; explicit arguments (e.g. from a config) win."""
        env = os.environ if env is None else env
        return cls(
            endpoint_url=endpoint_url or env.get("AWS_ENDPOINT_URL") or env.get("MLFLOW_S3_ENDPOINT_URL") or None,
            access_key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
            bucket=bucket or env.get("ICD_BUCKET") or None,
            max_attempts=_max_attempts(env.get("AWS_MAX_ATTEMPTS")),
        )

    @classmethod
    def from_config(cls, storage_config, env: Mapping[str, str] | None = None) -> "S3Settings":
        """From an `icd.config.StorageConfig`, falling back to the environment."""
        return cls.from_env(env, bucket=storage_config.bucket, endpoint_url=storage_config.endpoint_url)

    def require_credentials(self) -> None:
        missing = [name for name, value in (("AWS_ACCESS_KEY_ID", self.access_key),
                                            ("AWS_SECRET_ACCESS_KEY", self.secret_key)) if not value]
        if missing:
            raise StorageError(
                f"{' and '.join(missing)} not set: export the S3 credentials "
                "(for the local stack: eval \"$(icd stack env)\")"
            )

    def require_bucket(self) -> str:
        if not self.bucket:
            raise StorageError("no bucket configured: set storage.bucket in the config or export ICD_BUCKET")
        return self.bucket

    def uri(self, key: str = "") -> str:
        """``s3://<bucket>/<key>`` in the configured bucket."""
        return f"s3://{self.require_bucket()}/{key.lstrip('/')}"


def _max_attempts(text: str | None) -> int:
    if not text:
        return DEFAULT_MAX_ATTEMPTS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise StorageError(f"AWS_MAX_ATTEMPTS={text!r}: expected an integer >= 1 (attempts per S3 request)")
    return value


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"expected an s3://bucket/key URI, got {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def is_s3_uri(path: str) -> bool:
    return str(path).startswith("s3://")


def s3_client(settings: S3Settings | None = None):
    """A boto3 S3 client for the configured endpoint (path-style addressing)."""
    import boto3
    from botocore.config import Config as BotoConfig

    settings = settings or S3Settings.from_env()
    settings.require_credentials()
    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        aws_access_key_id=settings.access_key,
        aws_secret_access_key=settings.secret_key,
        region_name=settings.region,
        config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": settings.max_attempts, "mode": "standard"}),
    )


def s3_filesystem(settings: S3Settings | None = None) -> pafs.S3FileSystem:
    """A pyarrow ``S3FileSystem`` for the configured endpoint; paths are ``bucket/key``."""
    settings = settings or S3Settings.from_env()
    settings.require_credentials()
    kwargs = {}
    if settings.endpoint_url:
        endpoint = urlparse(settings.endpoint_url)
        if endpoint.scheme not in ("http", "https") or not endpoint.netloc:
            raise StorageError(
                f"AWS_ENDPOINT_URL={settings.endpoint_url!r}: expected http(s)://host:port"
            )
        kwargs.update(endpoint_override=endpoint.netloc, scheme=endpoint.scheme)
    return pafs.S3FileSystem(
        access_key=settings.access_key,
        secret_key=settings.secret_key,
        region=settings.region,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts),
        **kwargs,
    )


class RetryingS3Handler(pafs.FileSystemHandler):
    """``s3_filesystem(settings)`` behind pyarrow's `PyFileSystem`, so that it survives pickling.

    pyarrow's ``S3FileSystem`` drops its ``retry_strategy`` when pickled (an unpickled copy retries
    3 times, 2 s, whatever it was built with), and Ray pickles the ``storage_filesystem`` of a
    ``RunConfig`` to its controller and workers. This handler pickles the settings instead and
    builds the filesystem, with its retries, where it is used.
    """

    def __init__(self, settings: S3Settings):
        self.settings = settings
        self._fs = None

    def __getstate__(self) -> dict:
        return {"settings": self.settings}

    def __setstate__(self, state: dict) -> None:
        self.settings, self._fs = state["settings"], None

    @property
    def fs(self) -> pafs.S3FileSystem:
        if self._fs is None:
            self._fs = s3_filesystem(self.settings)
        return self._fs

    def __eq__(self, other) -> bool:
        return isinstance(other, RetryingS3Handler) and other.settings == self.settings

    def equals(self, other) -> bool:  # PyFileSystem.equals
        return self == other

    def get_type_name(self) -> str:
        return "s3"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def picklable_s3_filesystem(settings: S3Settings | None = None) -> pafs.PyFileSystem:
    """An S3 filesystem that keeps its retries when pickled (for Ray Train's ``storage_filesystem``)."""
    settings = settings or S3Settings.from_env()
    settings.require_credentials()
    return pafs.PyFileSystem(RetryingS3Handler(settings))


def filesystem_for(path: str, settings: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the filesystem-relative path for a local path or s3:// URI."""
    if is_s3_uri(path):
        bucket, key = split_s3_uri(path)
        return s3_filesystem(settings), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(path)


def read_json(uri: str, settings: S3Settings | None = None) -> dict | None:
    """A small JSON file (local or s3://), or None if it does not exist; used for completion markers."""
    import json

    fs, path = filesystem_for(uri, settings)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError):
        return None


def check_access(settings: S3Settings | None = None) -> None:
    """Fail with a readable `StorageError` unless the endpoint accepts the credentials and the bucket exists."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    settings = settings or S3Settings.from_env()
    bucket = settings.require_bucket()
    client = s3_client(settings)
    try:
        client.head_bucket(Bucket=bucket)
    except EndpointConnectionError:
        raise StorageError(
            f"cannot reach S3 at {settings.endpoint_url}: is the stack up? (icd stack up)"
        ) from None
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("403", "SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied") or status == 403:
            raise StorageError(
                f"S3 at {settings.endpoint_url} rejected the credentials of AWS_ACCESS_KEY_ID: "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (local stack: eval \"$(icd stack env)\")"
            ) from None
        if code in ("404", "NoSuchBucket") or status == 404:
            raise StorageError(f"bucket {bucket!r} does not exist at {settings.endpoint_url}") from None
        raise
