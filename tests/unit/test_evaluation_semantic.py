"""CLIP-T and DINOv2 similarity with small random models built from configs (no download)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config,
                          Dinov2Model)

from icd.evaluation.semantic import ClipTextSimilarity, DinoSimilarity, read_pairs, semantic_metrics
from icd.models.tokenizer import offline_clip_tokenizer

SIZE = {"shortest_edge": 32}
CROP = {"height": 32, "width": 32}


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16))
    return ClipTextSimilarity(model, CLIPImageProcessor(size=SIZE, crop_size=CROP), offline_clip_tokenizer())


@pytest.fixture(scope="module")
def dino():
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, image_size=32, patch_size=8))
    return DinoSimilarity(model, BitImageProcessor(size=SIZE, crop_size=CROP))


def picture(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8))


def test_clip_t_is_the_cosine_of_the_projected_embeddings(clip):
    images, texts = [picture(1), picture(2)], ["a red circle", "a blue square on a green background"]
    got = clip(images, texts)
    pixels = clip.image_processor(images=images, return_tensors="pt")["pixel_values"]
    ids = clip.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        image = clip.model.get_image_features(pixel_values=pixels).pooler_output
        text = clip.model.get_text_features(input_ids=ids).pooler_output
    expected = [float(torch.dot(a, b) / (a.norm() * b.norm())) for a, b in zip(image, text)]
    assert np.allclose(got, expected, atol=1e-5)


def test_dino_similarity_is_one_for_the_same_picture_and_lower_for_another(dino):
    same = dino([picture(3)], [picture(3)])
    other = dino([picture(3)], [picture(4)])
    assert same[0] == pytest.approx(1.0, abs=1e-5) and other[0] < same[0]


def test_pairs_csv_and_metrics_over_an_edit_function(tmp_path, clip, dino):
    for i in range(3):
        picture(i).save(tmp_path / f"p{i}.png")
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,source_prompt,target_prompt\n" +
                   "".join(f"p{i}.png,a photo,a photo of a cat\n" for i in range(3)))
    pairs = read_pairs(csv)
    assert pairs[0].image == str(tmp_path / "p0.png")
    metrics = semantic_metrics(lambda images, s, t: images, pairs, clip, dino, batch_size=2)
    assert metrics["pairs"] == 3 and metrics["dino"] == pytest.approx(1.0, abs=1e-5)
    bad = tmp_path / "bad.csv"
    bad.write_text("image,source\nx.png,a\n")
    with pytest.raises(ValueError, match="missing column"):
        read_pairs(bad)
    bad.write_text("image,source_prompt,target_prompt\nx.png,a,\n")
    with pytest.raises(ValueError, match="line 2: empty"):
        read_pairs(bad)


def test_evaluate_pairs_loads_both_models_from_directories_and_edits(tmp_path, clip, dino):
    """The production path: from_pretrained on local copies (hub ids work the same with network access)."""
    from icd.config import load_config
    from icd.evaluation.job import evaluate_pairs
    from icd.train.stages import StagePaths, build_stage_model, export_stage, make_manifest

    clip.model.save_pretrained(tmp_path / "clip")
    clip.image_processor.save_pretrained(tmp_path / "clip")
    clip.tokenizer.save_pretrained(tmp_path / "clip")
    dino.model.save_pretrained(tmp_path / "dino")
    dino.image_processor.save_pretrained(tmp_path / "dino")
    config = load_config("jobs/configs/toy.yaml")
    manifest = None
    for stage in ("cfg_distill", "icd"):
        paths = StagePaths.of(config, stage, "semantic", str(tmp_path / "out"))
        export_stage(build_stage_model(stage, config, manifest), paths.output)
        manifest = make_manifest(paths, config, manifest, 0, [])
    picture(5).save(tmp_path / "photo.png")
    (tmp_path / "pairs.csv").write_text("image,source_prompt,target_prompt\n"
                                        "photo.png,a red circle on a blue background,a green circle on a blue background\n")
    metrics = evaluate_pairs(config, manifest, str(tmp_path / "pairs.csv"), str(tmp_path / "clip"),
                             str(tmp_path / "dino"))
    assert metrics["pairs"] == 1 and -1 <= metrics["clip_t"] <= 1 and -1 <= metrics["dino"] <= 1
