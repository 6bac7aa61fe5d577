"""Pure preprocessing and shard parsing (no Ray)."""

import io

import numpy as np
import pytest
from PIL import Image

from icd.data.preprocess import BadSample, SampleFilter, decode_rgb, resize_and_crop, to_chw, to_model_range, to_rgb
from icd.data.shards import ShardSample, iter_tar_samples, write_shard


def _encode(image: Image.Image, fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_conversions_to_8bit_rgb():
    gray = Image.fromarray(np.full((4, 4), 100, np.uint8))
    assert np.asarray(to_rgb(gray))[0, 0].tolist() == [100, 100, 100]
    rgba = Image.fromarray(np.dstack([np.zeros((4, 4, 3), np.uint8), np.full((4, 4), 0, np.uint8)]), "RGBA")
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]  # transparent -> white
    sixteen = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert np.asarray(to_rgb(sixteen))[0, 0].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    palette = Image.fromarray(np.zeros((4, 4, 3), np.uint8)).convert("P")
    assert to_rgb(palette).mode == "RGB"


def test_decode_rejects_what_cannot_be_used():
    f = SampleFilter(max_pixels=10_000)
    with pytest.raises(BadSample, match="missing_image"):
        decode_rgb(None, f)
    with pytest.raises(BadSample, match="corrupt_image"):
        decode_rgb(b"GIF89a garbage", f)
    with pytest.raises(BadSample, match="decompression_bomb"):
        decode_rgb(_encode(Image.new("L", (200, 200))), f)
    png = _encode(Image.new("RGB", (64, 32), (1, 2, 3)))
    truncated = png[: len(png) // 2]
    with pytest.raises(BadSample, match="corrupt_image"):
        decode_rgb(truncated, SampleFilter())
    assert decode_rgb(png, SampleFilter()).size == (64, 32)


def test_filter_checks():
    f = SampleFilter(min_side=32, max_aspect_ratio=2.0, min_similarity=0.3, max_pwatermark=0.5)
    f.check_metadata("a caption", {})
    f.check_size(64, 32)
    for caption, meta, reason in [(None, {}, "missing_caption"), ("  ", {}, "missing_caption"),
                                  ("x", {"similarity": 0.2}, "low_similarity"), ("x", {"pwatermark": 0.8}, "watermark")]:
        with pytest.raises(BadSample) as info:
            f.check_metadata(caption, meta)
        assert info.value.reason == reason
    for size, reason in [((31, 64), "too_small"), ((100, 32), "aspect_ratio"), ((1, 1), "too_small")]:
        with pytest.raises(BadSample) as info:
            f.check_size(*size)
        assert info.value.reason == reason


def test_resize_short_side_and_crop():
    image = Image.fromarray(np.arange(60 * 80 * 3, dtype=np.uint32).reshape(60, 80, 3).astype(np.uint8))
    out = resize_and_crop(image, 30, "center")
    assert out.shape == (30, 30, 3)
    a = resize_and_crop(image, 30, "random", np.random.default_rng(1))
    b = resize_and_crop(image, 30, "random", np.random.default_rng(1))
    assert np.array_equal(a, b)
    square = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    assert np.array_equal(resize_and_crop(square, 32), np.asarray(square))  # no-op when already the size
    chw = to_chw(np.array([[[0, 255, 127]]], np.uint8))
    assert chw.shape == (3, 1, 1) and chw.dtype == np.uint8
    x = to_model_range(chw)
    assert x[0, 0, 0] == -1.0 and x[1, 0, 0] == 1.0
    import torch
    assert torch.equal(to_model_range(torch.from_numpy(chw)), torch.from_numpy(x))


def test_shard_write_then_parse_with_duplicate_keys():
    buffer, parquet = io.BytesIO(), io.BytesIO()
    samples = [ShardSample("a", b"img-a", "png", "cap a", {"similarity": 0.3}),
               ShardSample("b", b"img-b", "jpg", "cap b", {})]
    assert write_shard(samples + [ShardSample("a", b"img-a2", "png", "cap a again", {})], buffer, parquet) == 3
    parsed = list(iter_tar_samples(buffer.getvalue()))
    assert [(s.key, s.image, s.caption) for s in parsed] == [("a", b"img-a", "cap a"), ("b", b"img-b", "cap b"),
                                                             ("a", b"img-a2", "cap a again")]
    assert parsed[0].meta["similarity"] == 0.3 and parsed[1].image_ext == "jpg"
    data = buffer.getvalue()
    cut = list(iter_tar_samples(data[: data.index(b"img-b") + 2]))
    assert cut[-1] == "truncated" and cut[0].key == "a"


def test_the_crop_origin_and_original_size_for_sdxls_size_conditioning():
    from icd.data.preprocess import original_size, resize_and_crop_with_origin

    # 80 x 60 -> short side 30: 40 x 30, a centred 30-square starts 5 px from the left
    image = Image.fromarray(np.arange(60 * 80 * 3, dtype=np.uint32).reshape(60, 80, 3).astype(np.uint8))
    pixels, origin = resize_and_crop_with_origin(image, 30, "center")
    assert origin == (0, 5) and np.array_equal(pixels, resize_and_crop(image, 30, "center"))
    resized = np.asarray(image.resize((40, 30), Image.BICUBIC))
    assert np.array_equal(pixels, resized[0:30, 5:35])  # the origin is where the crop was taken
    rng = np.random.default_rng(3)
    pixels, (top, left) = resize_and_crop_with_origin(image, 30, "random", rng)
    assert top == 0 and 0 <= left <= 10 and np.array_equal(pixels, resized[0:30, left:left + 30])
    assert original_size({"original_width": 1600, "original_height": 1200}, (80, 60)) == (1200, 1600)
    assert original_size({}, (80, 60)) == (60, 80)


def test_the_preprocessor_gives_each_sample_its_size_ids():
    import io

    from icd.data.reader import PreprocessOptions, Preprocessor

    def png(width, height):
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
        return buffer.getvalue()

    options = PreprocessOptions(32, "center", SampleFilter(min_side=16), 0)
    out = Preprocessor(options)({"key": ["a", "b"], "image": [png(64, 48), png(40, 40)], "caption": ["x", "y"],
                                 "meta": ['{"original_width": 640, "original_height": 480}', "{}"]})
    assert out["size_ids"].tolist() == [[480, 640, 0, 5], [40, 40, 0, 0]] and out["size_ids"].dtype == np.int64
