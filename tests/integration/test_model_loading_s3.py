"""Base models in diffusers layout loaded from the stack's S3 (s3:// URIs), as the sd15 preset can."""

import pytest
import torch
from pyarrow import fs as pafs

from icd.models.loading import ModelLoadError, load_bundle, save_bundle
from icd.models.toy import tiny_bundle
from icd.storage import s3_filesystem


def test_load_bundle_from_s3_equals_the_original(stack_env, tmp_path):
    original = tiny_bundle(seed=7)
    local = save_bundle(original, tmp_path / "tiny")
    uri = f"s3://{stack_env.bucket}/models/tiny-{tmp_path.name}"
    pafs.copy_files(str(local), uri.removeprefix("s3://"), destination_filesystem=s3_filesystem())

    loaded = load_bundle(uri, cache_dir=tmp_path / "cache")
    x = torch.randn(2, 4, 8, 8)
    prompts = ["a red circle on a blue background"] * 2
    assert torch.equal(loaded.eps(x, 259, loaded.encode_prompts(prompts)), original.eps(x, 259, original.encode_prompts(prompts)))
    assert loaded.source == uri
    # A second load comes from the local cache.
    assert load_bundle(uri, cache_dir=tmp_path / "cache").unet.config == loaded.unet.config


def test_missing_s3_model_is_a_clear_error(stack_env, tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory in object storage"):
        load_bundle(f"s3://{stack_env.bucket}/models/does-not-exist", cache_dir=tmp_path)
