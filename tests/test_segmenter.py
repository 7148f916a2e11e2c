"""The segmenter as its users see it: save, load, refuse bad checkpoints, predict masks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import CheckpointError, save_checkpoint
from models.segmenter import DEFAULT_CHECKPOINT, Segmenter, SegmenterConfig, build_network
from models.segmenter.data import read_rgb

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FFHQ_IMAGE = DATA / "ffhq" / "15723.jpg"
SMALL = SegmenterConfig(input_size=64, model_kwargs={"decoder_channels": [16, 16, 16, 16, 16]})


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((90, 70), (64, 64), (120, 200))]


def _fresh(cfg: SegmenterConfig = SMALL) -> Segmenter:
    torch.manual_seed(0)
    return Segmenter(build_network(cfg), cfg)


def test_round_trip_gives_identical_masks_and_probabilities(tmp_path: Path) -> None:
    seg = _fresh()
    sha = seg.save(str(tmp_path / "ckpt"), training={"note": "test"})
    loaded = Segmenter.load(str(tmp_path / "ckpt"))
    images = _images()
    assert loaded.sha256 == sha
    assert loaded.cfg.training == {"note": "test"}
    np.testing.assert_array_equal(loaded.predict_probs(images), seg.predict_probs(images))
    for a, b, im in zip(loaded.predict_masks(images), seg.predict_masks(images), images):
        assert a.shape == im.shape[:2] and a.dtype == np.uint8 and set(np.unique(a)) <= {0, 1}
        np.testing.assert_array_equal(a, b)



def test_fixed_passes_give_each_image_the_mask_it_gets_alone() -> None:
    seg = _fresh()
    seg.fixed_rows = 2  # what a GPU does at gpu_rows
    seen: set[int] = set()
    seg.network.register_forward_pre_hook(lambda _, args: seen.add(args[0].shape[0]))
    images = _images()
    alone = [seg.predict_masks([im])[0] for im in images]
    for a, b in zip(seg.predict_masks(images), alone):
        np.testing.assert_array_equal(a, b)
    assert seen == {2}


def test_flip_averaging_from_the_config_makes_mirrored_faces_get_mirrored_masks(tmp_path: Path) -> None:
    image = _images()[2]
    plain = _fresh()
    averaged_cfg = SegmenterConfig(**{**SMALL.__dict__, "flip_average": True})
    Segmenter(plain.network, averaged_cfg).save(str(tmp_path / "ckpt"))
    averaged = Segmenter.load(str(tmp_path / "ckpt"))
    assert averaged.cfg.flip_average

    def mirror_gap(seg: Segmenter) -> float:
        probs, mirrored = seg.predict_probs([image, image[:, ::-1].copy()])
        return float(np.abs(probs[:, ::-1] - mirrored).max())

    assert mirror_gap(plain) > 1e-3
    assert mirror_gap(averaged) < 1e-6
def test_weights_that_do_not_match_the_config_hash_are_refused(tmp_path: Path) -> None:
    _fresh().save(str(tmp_path / "a"))
    weights = tmp_path / "a" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match="do not belong together"):
        Segmenter.load(str(tmp_path / "a"))


def test_weights_for_another_encoder_are_refused_with_the_architecture_named(tmp_path: Path) -> None:
    other = SegmenterConfig(encoder="resnet18", input_size=64, model_kwargs=SMALL.model_kwargs)
    save_checkpoint(str(tmp_path / "b"), _fresh().network.state_dict(), other.to_dict())
    with pytest.raises(CheckpointError, match="Unet/resnet18"):
        Segmenter.load(str(tmp_path / "b"))


def test_missing_or_wrong_kind_of_checkpoint_says_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        Segmenter.load(str(tmp_path / "nowhere"))
    save_checkpoint(str(tmp_path / "c"), {}, {"kind": "classifier"})
    with pytest.raises(CheckpointError, match="'classifier' checkpoint"):
        Segmenter.load(str(tmp_path / "c"))


def test_invalid_config_values_are_refused(tmp_path: Path) -> None:
    save_checkpoint(str(tmp_path / "d"), _fresh().network.state_dict(), dict(SMALL.to_dict(), threshold=1.5))
    with pytest.raises(CheckpointError, match="threshold"):
        Segmenter.load(str(tmp_path / "d"))


def test_default_checkpoint_is_small_and_gives_full_resolution_masks() -> None:
    folder = Path(DEFAULT_CHECKPOINT)
    assert sum(f.stat().st_size for f in folder.glob("*.safetensors")) < 15_000_000
    config = json.loads((folder / "config.json").read_text())
    assert config["training"]["split"]["val_groups"], "the default checkpoint must record its validation split"
    seg = Segmenter.load(DEFAULT_CHECKPOINT)
    image = np.full((1024, 1024, 3), 128, np.uint8)
    (mask,) = seg.predict_masks([image])
    assert mask.shape == (1024, 1024) and mask.dtype == np.uint8


@pytest.mark.skipif(not FFHQ_IMAGE.exists(), reason=f"real FFHQ sample not found at {FFHQ_IMAGE}")
def test_default_checkpoint_finds_the_face_skin_on_a_real_ffhq_image() -> None:
    image = read_rgb(FFHQ_IMAGE)
    (mask,) = Segmenter.load(DEFAULT_CHECKPOINT).predict_masks([image])
    # FFHQ alignment puts the eyes at y ~480 and the mouth at y ~760: between them lie the
    # cheeks and nose, all skin. The corners are background and hair.
    assert mask[540:700, 350:650].mean() > 0.97
    assert 0.15 < mask.mean() < 0.7
