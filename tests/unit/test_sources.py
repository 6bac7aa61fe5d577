import io

import numpy as np
import pytest
from PIL import Image

from icd.data.shards import iter_tar_samples, write_dataset
from icd.data.sources import folder_samples, shapes_samples


def _save(path, size=(40, 30)):
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(path)


def test_folder_with_sidecar_captions_and_csv(tmp_path):
    (tmp_path / "sub").mkdir()
    _save(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("a dog on a beach\n")
    _save(tmp_path / "sub" / "b.png")
    _save(tmp_path / "no_caption.png")
    samples = list(folder_samples(tmp_path))
    assert [(s.key, s.caption, s.image_ext, s.meta["width"], s.meta["height"]) for s in samples] == [
        ("a", "a dog on a beach", "jpg", 40, 30)]
    csv_path = tmp_path / "captions.csv"
    csv_path.write_text("file,caption\nsub/b.png,a cat\n")
    keys = {s.key: s.caption for s in folder_samples(tmp_path, csv_path)}
    assert keys == {"a": "a dog on a beach", "sub_b": "a cat"}
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("path,text\n")
    with pytest.raises(ValueError, match="expected columns 'file' and 'caption'"):
        list(folder_samples(tmp_path, bad_csv))
    with pytest.raises(FileNotFoundError):
        list(folder_samples(tmp_path / "missing"))


def test_write_dataset_locally_in_whole_shards(tmp_path):
    stats = write_dataset(shapes_samples(25, seed=3), str(tmp_path / "ds"), per_shard=10)
    assert stats == {"count": 25, "shards": 3, "per_shard": 10}
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [
        "00000.parquet", "00000.tar", "00001.parquet", "00001.tar", "00002.parquet", "00002.tar", "_stats.json"]
    parsed = list(iter_tar_samples((tmp_path / "ds" / "00002.tar").read_bytes()))
    assert [s.key for s in parsed] == [f"{i:09d}" for i in range(23, 28)]
    image = Image.open(io.BytesIO(parsed[0].image))
    assert image.size == (32, 32) and parsed[0].meta["shape"] in parsed[0].caption
