"""The data plane against the stack's S3 and a local Ray: shards, filters, bad samples, latent cache."""

from __future__ import annotations

import io
import tarfile
import threading

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from icd.data.latent_cache import build_latent_cache, cache_uri, model_hash, read_latent_cache
from icd.data.preprocess import SampleFilter, to_model_range
from icd.data.reader import PreprocessOptions, counts, preprocess, preprocess_shards, read_laion_parquet, read_raw
from icd.data.feeding import epoch_batches, ingest_config
from icd.data.shards import ShardSample, write_dataset
from icd.data.shapes import random_sample
from icd.data.sources import shapes_samples
from icd.models.loading import load_bundle, save_bundle
from icd.models.toy import tiny_bundle
from icd.storage import filesystem_for, s3_filesystem


def _uri(stack, name):
    return f"s3://{stack.bucket}/datasets/test-{name}"


def _collect(ds) -> dict:
    rows = {}
    for batch in ds.iter_batches(batch_size=128, batch_format="numpy"):
        for i, key in enumerate(batch["key"]):
            rows[key] = {k: batch[k][i] for k in batch}
    return rows


def test_shard_round_trip_through_s3(stack_env, local_ray):
    uri = _uri(stack_env, "roundtrip")
    stats = write_dataset(shapes_samples(300, seed=10), uri, per_shard=128)
    assert stats == {"count": 300, "shards": 3, "per_shard": 128}
    fs, root = filesystem_for(uri)
    names = sorted(i.base_name for i in fs.get_file_info(__import__("pyarrow.fs").fs.FileSelector(root)))
    assert names == ["00000.parquet", "00000.tar", "00001.parquet", "00001.tar", "00002.parquet", "00002.tar", "_stats.json"]

    rows = _collect(preprocess(read_raw(uri), PreprocessOptions(resolution=32, counter_name="roundtrip")))
    assert len(rows) == 300 and counts("roundtrip") == {"ok": 300}
    for seed in (10, 150, 309):
        expected = random_sample(seed)
        row = rows[f"{seed:09d}"]
        assert row["caption"] == expected.caption
        # PNG is lossless: the exact pixels come back.
        assert np.array_equal(row["pixels"].transpose(1, 2, 0), expected.image)
    mean = np.mean([to_model_range(r["pixels"]).mean() for r in rows.values()])
    expected_mean = np.mean([random_sample(s).image.astype(np.float32).mean() / 127.5 - 1 for s in range(10, 310)])
    assert mean == pytest.approx(expected_mean, abs=1e-5)
    # The parquet beside each tar holds the same metadata.
    import pyarrow.parquet as pq
    table = pq.read_table(f"{root}/00001.parquet", filesystem=fs)
    assert table.num_rows == 128 and table.column("caption")[0].as_py() == random_sample(138).caption


def _png(array, mode=None, **save):
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format=save.pop("format", "PNG"), **save)
    return buffer.getvalue()


def _poisoned_samples() -> tuple[list[ShardSample], dict[str, int], int]:
    good = [ShardSample(f"good{i}", _png(random_sample(i).image), "png", random_sample(i).caption,
                        {"width": 32, "height": 32}) for i in range(6)]
    rgb = random_sample(99).image
    gray = ShardSample("gray", _png(rgb.mean(-1).astype(np.uint8)), "png", "gray", {})
    cmyk_buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk_buf, format="JPEG")
    cmyk = ShardSample("cmyk", cmyk_buf.getvalue(), "jpg", "cmyk", {})
    alpha = ShardSample("alpha", _png(np.dstack([rgb, np.full((32, 32), 128, np.uint8)])), "png", "alpha", {})
    sixteen_buf = io.BytesIO()
    Image.fromarray((rgb.mean(-1) * 257).astype(np.uint16)).save(sixteen_buf, format="PNG")
    sixteen = ShardSample("sixteen", sixteen_buf.getvalue(), "png", "16 bit", {})
    converted = [gray, cmyk, alpha, sixteen]
    bomb_buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb_buf, format="PNG")
    bad = [
        ShardSample("corrupt", b"\x89PNG\r\n\x1a\n not really a png", "png", "corrupt", {}),
        ShardSample("nocaption", _png(rgb), "png", None, {}),
        ShardSample("onepixel", _png(rgb[:1, :1]), "png", "one pixel", {}),
        ShardSample("bomb", bomb_buf.getvalue(), "png", "bomb", {}),
        ShardSample("noimage", None, None, "no image", {}),
    ]
    expected = {"corrupt_image": 1, "missing_caption": 1, "too_small": 1, "decompression_bomb": 1, "missing_image": 1}
    return good + converted + bad, expected, len(good) + len(converted)


def test_poisoned_shard_yields_every_good_sample_and_counts_the_bad(stack_env, local_ray):
    uri = _uri(stack_env, "poisoned")
    samples, expected_bad, n_good = _poisoned_samples()
    write_dataset(samples, uri, per_shard=len(samples))
    # A second shard whose tar is cut in the middle of its last member.
    fs, root = filesystem_for(uri)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i, key in enumerate(("trunc_ok", "trunc_cut")):
            for ext, data in (("png", _png(random_sample(200 + i).image)), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    cut = data.index(b"trunc_cut.png") + 512 + 40  # header plus 40 bytes of the image
    with fs.open_output_stream(f"{root}/00001.tar") as out:
        out.write(data[:cut])

    options = PreprocessOptions(resolution=32, sample_filter=SampleFilter(min_side=8), counter_name="poisoned")
    rows = _collect(preprocess(read_raw(uri), options))
    assert set(rows) == {f"good{i}" for i in range(6)} | {"gray", "cmyk", "alpha", "sixteen", "trunc_ok"}
    got = counts("poisoned")
    assert got.pop("ok") == n_good + 1
    # The truncated tar gives its complete sample, then one truncated_tar record.
    assert got == {**expected_bad, "truncated_tar": 1}
    # Converted images really are RGB; the half-transparent one was composited on white.
    assert rows["gray"]["pixels"].shape == (3, 32, 32) and rows["gray"]["pixels"].dtype == np.uint8
    assert np.array_equal(rows["gray"]["pixels"][0], rows["gray"]["pixels"][2])
    a = 128 / 255
    expected_alpha = random_sample(99).image.astype(np.float64) * a + 255 * (1 - a)
    assert np.abs(rows["alpha"]["pixels"].transpose(1, 2, 0) - expected_alpha).max() <= 1.0

    # The fused path training uses (actors split whole tars) yields the same rows and counts.
    fused_options = PreprocessOptions(resolution=32, sample_filter=SampleFilter(min_side=8), counter_name="fused")
    fused = _collect(preprocess_shards(uri, fused_options, batch_size=4))
    assert set(fused) == set(rows) and counts("fused") == counts("poisoned")
    for key, row in rows.items():
        assert np.array_equal(fused[key]["pixels"], row["pixels"]) and fused[key]["caption"] == row["caption"]
        assert np.array_equal(fused[key]["input_ids"], row["input_ids"])


def test_filters_keep_and_drop_what_they_should(stack_env, local_ray):
    uri = _uri(stack_env, "filters")
    img = lambda w, h: _png(np.zeros((h, w, 3), np.uint8))
    samples = [
        ShardSample("keep", img(40, 32), "png", "fine", {"similarity": 0.35, "pwatermark": 0.1}),
        ShardSample("keep_unscored", img(32, 32), "png", "no scores", {}),
        ShardSample("low_sim", img(32, 32), "png", "dissimilar", {"similarity": 0.1}),
        ShardSample("watermarked", img(32, 32), "png", "wm", {"pwatermark": 0.9}),
        ShardSample("small", img(20, 40), "png", "small", {}),
        ShardSample("wide", img(200, 32), "png", "wide", {}),
        ShardSample("blank_caption", img(32, 32), "png", "   ", {}),
    ]
    write_dataset(samples, uri, per_shard=10)
    sample_filter = SampleFilter(min_side=32, max_aspect_ratio=2.0, min_similarity=0.28, max_pwatermark=0.5)
    options = PreprocessOptions(resolution=32, sample_filter=sample_filter, counter_name="filters")
    rows = _collect(preprocess(read_raw(uri), options))
    assert set(rows) == {"keep", "keep_unscored"}
    assert counts("filters") == {"ok": 2, "low_similarity": 1, "watermark": 1, "too_small": 1, "aspect_ratio": 1,
                                 "missing_caption": 1}
    assert rows["keep"]["pixels"].shape == (3, 32, 32)  # 40x32 resized and centre-cropped


def test_laion_parquet_with_image_bytes(stack_env, local_ray):
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs = s3_filesystem()
    path = f"{stack_env.bucket}/datasets/test-laion-parquet/part-0.parquet"
    table = pa.table({"key": [f"k{i}" for i in range(5)], "jpg": [_png(random_sample(i).image) for i in range(5)],
                      "caption": [random_sample(i).caption for i in range(5)], "similarity": [0.3] * 5})
    pq.write_table(table, path, filesystem=fs)
    rows = _collect(preprocess(read_laion_parquet(f"s3://{stack_env.bucket}/datasets/test-laion-parquet"),
                               PreprocessOptions(resolution=16, counter_name="laion")))
    assert sorted(rows) == [f"k{i}" for i in range(5)] and rows["k3"]["caption"] == random_sample(3).caption
    assert rows["k0"]["pixels"].shape == (3, 16, 16)


def _cache_inputs(stack, tmp_path) -> tuple[str, str, PreprocessOptions, str]:
    """96 shapes samples in S3 and a tiny model: (dataset uri, model dir, options, cache uri)."""
    uri = _uri(stack, "cache")
    write_dataset(shapes_samples(96, seed=500), uri, per_shard=50)
    base = str(save_bundle(tiny_bundle(seed=11), tmp_path / "tiny"))
    options = PreprocessOptions(resolution=32, counter_name="cache")
    return uri, base, options, cache_uri("test-cache", model_hash(base, None, options))


def test_latent_cache_equals_direct_encoding(stack_env, local_ray, tmp_path):
    uri, base, options, out = _cache_inputs(stack_env, tmp_path)
    manifest = build_latent_cache(uri, out, base, options)
    assert manifest["samples"] == {"ok": 96} and not manifest["reused"]
    assert build_latent_cache(uri, out, base, options)["reused"]  # built once

    rows = _collect(read_latent_cache(out))
    assert len(rows) == 96
    bundle = load_bundle(base)
    keys = [f"{s:09d}" for s in (500, 540, 595)]
    images = torch.stack([torch.from_numpy(random_sample(int(k)).image).permute(2, 0, 1).float() / 127.5 - 1
                          for k in keys])
    with torch.no_grad():
        latents = bundle.encode_images(images)
        hidden = bundle.encode_prompts([random_sample(int(k)).caption for k in keys])
    for i, key in enumerate(keys):
        assert np.abs(rows[key]["latents"] - latents[i].numpy()).max() < 1e-5
        assert np.abs(rows[key]["encoder_hidden_states"] - hidden[i].numpy()).max() < 1e-5
    # Another model gives another cache location.
    assert model_hash(str(save_bundle(tiny_bundle(seed=12), tmp_path / "tiny2")), None, options) != model_hash(base, None, options)


def test_latent_cache_feeds_train_workers_that_hold_every_cpu(stack_env, local_ray, tmp_path):
    """Two 1-CPU train workers on the 2-CPU local Ray still get the whole cache: its read tasks need
    no CPU (asking for a quarter of one, they were never scheduled and the workers waited forever)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    uri, base, options, out = _cache_inputs(stack_env, tmp_path)
    build_latent_cache(uri, out, base, options)  # reused when the test above built it
    seen = tmp_path / "seen"
    seen.mkdir()

    def count_rows(_):
        shard = ray.train.get_dataset_shard("train")
        rows = sum(len(batch["latents"]) for batch in shard.iter_torch_batches(batch_size=8))
        (seen / str(ray.train.get_context().get_world_rank())).write_text(str(rows))

    trainer = TorchTrainer(count_rows, datasets={"train": read_latent_cache(out).select_columns(["latents"])},
                           scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                           run_config=ray.train.RunConfig(storage_path=str(tmp_path / "runs")))
    # In a thread: a starved run waits forever inside Ray, out of reach of pytest's timeout.
    errors = []
    fit = threading.Thread(target=lambda: _record_errors(trainer.fit, errors), daemon=True)
    fit.start()
    fit.join(240)
    assert not fit.is_alive(), "the train workers got no data within 240 s (read tasks starved of CPU)"
    assert not errors, errors
    assert sorted(int(f.read_text()) for f in seen.iterdir()) == [48, 48]


def test_latent_cache_reads_a_few_files_at_a_time(local_ray, tmp_path):
    """Read tasks that ask for no CPU are still bounded: a preview of a 200-file cache starts a few
    worker processes, not one per file (unbounded: 81 here; the toy preset's 200-file cache
    started 100+ on a 2-core node and a 4-row preview took 68 s instead of 2)."""
    import json

    import psutil
    import pyarrow as pa
    import pyarrow.parquet as pq

    from icd.data.latent_cache import MANIFEST, READ_TASKS

    latents = np.zeros((64, 1024), np.float32)  # 256 KiB files: Ray Data gives each its own read task
    for i in range(200):
        table = pa.table({"key": [f"k{i}-{j}" for j in range(64)], "latents": list(latents)})
        pq.write_table(table, tmp_path / f"part-{i:03d}.parquet")
    (tmp_path / MANIFEST).write_text(json.dumps({"dataset": "test", "samples": {"ok": 200 * 64}}))

    port = f"--node-manager-port={ray._private.worker._global_node.node_manager_port}"

    def workers() -> set[int]:
        pids = set()
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if any("default_worker.py" in part for part in cmdline) and port in cmdline:
                pids.add(proc.info["pid"])
        return pids

    before, started, done = workers(), set(), threading.Event()

    def watch():
        while not done.is_set():
            started.update(workers() - before)
            done.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        rows = read_latent_cache(str(tmp_path)).take_batch(4, batch_format="numpy")
    finally:
        done.set()
        watcher.join()
    assert len(rows["key"]) == 4
    assert len(started) <= READ_TASKS + 2, f"{len(started)} worker processes started for a 4-row preview"


def _record_errors(call, errors: list) -> None:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - reported by the test thread
        errors.append(exc)


def test_epoch_shuffle_is_deterministic_and_splits_partition_the_data(local_ray):
    ds = ray.data.range(256).map(lambda r: {"id": np.int64(r["id"])}).materialize()
    order = lambda epoch: torch.cat([b["id"] for b in epoch_batches(ds.iterator(), epoch, 16, seed=3)]).tolist()
    assert order(0) == order(0) and order(0) != order(1) and sorted(order(1)) == list(range(256))

    splits = ds.streaming_split(2, equal=True)
    seen = [[], []]

    def consume(i):
        for batch in epoch_batches(splits[i], 0, 8, seed=3):
            seen[i].extend(batch["id"].tolist())

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) == len(seen[1]) == 128


def _split_orders(preserve_order: bool, shuffle_buffer: int) -> list[list[int]]:
    """The ids each of two train workers sees, through Ray Train's own dataset config."""
    import time

    def slow_first_blocks(batch):  # of two blocks read side by side, the later finishes first
        time.sleep(0.1 * (15 - int(batch["id"][0]) // 16))
        return batch

    ds = ray.data.range(256, override_num_blocks=16).map_batches(slow_first_blocks, batch_size=None)
    node = ray.get_runtime_context().get_node_id()
    splits = [s["train"] for s in ingest_config(preserve_order).configure({"train": ds}, 2, None, [node, node])]
    seen, errors = [[], []], []

    def consume(i):
        for batch in epoch_batches(splits[i], 0, 8, seed=3, shuffle_buffer=shuffle_buffer):
            seen[i].extend(batch["id"].tolist())

    threads = [threading.Thread(target=_record_errors, args=(lambda i=i: consume(i), errors)) for i in range(2)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert not errors and not set(seen[0]) & set(seen[1]) and len(seen[0]) == len(seen[1]) == 128
    return seen


def test_preserve_order_gives_each_worker_its_rows_in_read_order_on_every_run(local_ray):
    # In read order the splitter alternates (the split with fewer rows gets the next block, ties to
    # the first): worker 0 sees blocks 0, 2, 4, ..., worker 1 blocks 1, 3, 5, ..., each in order.
    by_rule = [[i for block in range(w, 16, 2) for i in range(16 * block, 16 * block + 16)] for w in range(2)]
    assert _split_orders(preserve_order=True, shuffle_buffer=0) == by_rule
    assert _split_orders(preserve_order=True, shuffle_buffer=32) == _split_orders(preserve_order=True, shuffle_buffer=32)
    # The control: in completion order block 1 overtakes block 0, so the test can tell the two apart.
    assert _split_orders(preserve_order=False, shuffle_buffer=0) != by_rule
