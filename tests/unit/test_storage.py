import pytest
from pyarrow import fs as pafs

from icd.config import StorageConfig
from icd.storage import S3Settings, StorageError, filesystem_for, s3_client, s3_filesystem, split_s3_uri

ENV = {"AWS_ENDPOINT_URL": "http://127.0.0.1:8333", "AWS_ACCESS_KEY_ID": "k",
       "AWS_SECRET_ACCESS_KEY": "s", "ICD_BUCKET": "b", "AWS_DEFAULT_REGION": "eu-west-1"}


def test_split_s3_uri():
    assert split_s3_uri("s3://bucket/a/b.tar") == ("bucket", "a/b.tar")
    assert split_s3_uri("s3://bucket") == ("bucket", "")
    for bad in ("bucket/a", "s3:///a", "http://x/y"):
        with pytest.raises(StorageError, match="expected an s3://bucket/key URI"):
            split_s3_uri(bad)


def test_settings_from_env_and_config_precedence():
    s = S3Settings.from_env(ENV)
    assert (s.endpoint_url, s.access_key, s.secret_key, s.region, s.bucket) == (
        "http://127.0.0.1:8333", "k", "s", "eu-west-1", "b")
    cfg = StorageConfig(bucket="other", endpoint_url="http://10.0.0.1:9000")
    s = S3Settings.from_config(cfg, ENV)
    assert s.bucket == "other" and s.endpoint_url == "http://10.0.0.1:9000" and s.access_key == "k"
    assert S3Settings.from_env({"MLFLOW_S3_ENDPOINT_URL": "http://h:1"}).endpoint_url == "http://h:1"
    assert "topsecret" not in repr(S3Settings.from_env({"AWS_SECRET_ACCESS_KEY": "topsecret"}))


def test_missing_credentials_and_bucket_are_explained():
    s = S3Settings.from_env({"AWS_ENDPOINT_URL": "http://127.0.0.1:8333"})
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY not set"):
        s3_client(s)
    with pytest.raises(StorageError, match="AWS_SECRET_ACCESS_KEY not set"):
        s3_filesystem(S3Settings.from_env({"AWS_ACCESS_KEY_ID": "k"}))
    with pytest.raises(StorageError, match="ICD_BUCKET"):
        s.uri("x")


def test_filesystems():
    s = S3Settings.from_env(ENV)
    fs = s3_filesystem(s)
    assert isinstance(fs, pafs.S3FileSystem)
    fs, path = filesystem_for("s3://b/datasets/x/", s)
    assert isinstance(fs, pafs.S3FileSystem) and path == "b/datasets/x"
    fs, path = filesystem_for("relative/dir")
    assert isinstance(fs, pafs.LocalFileSystem) and path.endswith("relative/dir") and path.startswith("/")
    assert s.uri("/latents/x") == "s3://b/latents/x"
    with pytest.raises(StorageError, match="expected http"):
        s3_filesystem(S3Settings.from_env({**ENV, "AWS_ENDPOINT_URL": "127.0.0.1:8333"}))


def test_requests_retry_aws_max_attempts_times(monkeypatch):
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    assert S3Settings.from_env(env).max_attempts == 10
    settings = S3Settings.from_env({**env, "AWS_MAX_ATTEMPTS": "7"})
    assert settings.max_attempts == 7
    assert s3_client(settings).meta.config.retries["total_max_attempts"] == 8  # botocore counts the first try
    with pytest.raises(StorageError, match="AWS_MAX_ATTEMPTS='none'"):
        S3Settings.from_env({**env, "AWS_MAX_ATTEMPTS": "none"})
    built = []
    real = pafs.AwsStandardS3RetryStrategy
    monkeypatch.setattr(pafs, "AwsStandardS3RetryStrategy", lambda max_attempts: built.append(max_attempts) or real(max_attempts))
    s3_filesystem(settings)
    assert built == [7]


def test_the_filesystem_for_ray_train_keeps_its_retries_when_pickled(monkeypatch):
    """pyarrow's S3FileSystem drops retry_strategy when pickled; Ray pickles RunConfig's storage_filesystem."""
    import pickle

    from icd.storage import RetryingS3Handler, picklable_s3_filesystem

    settings = S3Settings.from_env({"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k",
                                    "AWS_SECRET_ACCESS_KEY": "s", "AWS_MAX_ATTEMPTS": "7"})
    # the pyarrow behaviour this works around (when this fails, pyarrow keeps the strategy itself)
    assert "retry_strategy" not in s3_filesystem(settings).__reduce__()[1][0]
    fs = pickle.loads(pickle.dumps(picklable_s3_filesystem(settings)))
    assert isinstance(fs.handler, RetryingS3Handler) and fs.handler.settings == settings
    built = []
    real = pafs.AwsStandardS3RetryStrategy
    monkeypatch.setattr(pafs, "AwsStandardS3RetryStrategy", lambda max_attempts: built.append(max_attempts) or real(max_attempts))
    assert isinstance(fs.handler.fs, pafs.S3FileSystem) and built == [7]  # built where used, with the retries
    assert fs.type_name == "py::s3"
