"""Training on generated patch datasets: lesions are counted, faces are judged clear or acne."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from models.classifier import SEVERITIES, Classifier, ClassifierConfig
from models.classifier.data import load_patch_set
from models.classifier.train import (
    Trainer,
    augment,
    budget_use,
    choose_threshold,
    fit_acne_calibration,
    fit_severity,
    main,
    parse_args,
)
from tests.classifier_data import MIN_PATCH_SKIN, save_untrained_classifier, write_patch_dataset

FAST = ["--arch", "test_byobnet", "--input-size", "24", "--batch-size", "16", "--threads", "1"]
GRADES = {g: 3 for g in SEVERITIES}
VALIDATION = {"clear": 6, **{g: 2 for g in SEVERITIES}}


def _train(datasets: list[str], out: Path, *extra: str) -> dict:
    assert main([*datasets, "--output", str(out), *FAST, *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Clear faces (no spots, no lesion boxes) and graded faces (spots, with their counts)."""
    return write_patch_dataset(
        tmp_path_factory.mktemp("mixed") / "mixed",
        {"train": {"clear": 12, **GRADES}, "validation": VALIDATION, "test": VALIDATION},
    )


@pytest.fixture(scope="module")
def trained(mixed: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("trained") / "ckpt"
    return out, _train([str(mixed)], out, "--epochs", "3", "--epoch-patches", "256", "--lr", "5e-3")


def test_learns_to_tell_clear_from_acne_faces(trained: tuple[Path, dict], mixed: Path) -> None:
    _, metrics = trained
    binary = metrics["validation"]["binary"]
    assert binary["macro_f1"] >= 0.9 and binary["roc_auc"] >= 0.9
    assert binary["faces"] == 6 + 8 and binary["classes"] == ["clear", "acne"]
    assert binary["by_source"]["mixed"]["clear"]["faces"] == 6 and binary["by_source"]["mixed"]["acne"]["faces"] == 8
    assert metrics["validation"]["severity"]["faces"] == 8
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3]
    # The network counts spots: on the test faces, predicted lesions follow the true ones.
    clf = Classifier.load(str(trained[0]))
    test = load_patch_set(str(mixed), "test", 24)
    predicted, grades = clf.predict_patches(list(test.pixels))
    truth = np.nan_to_num(test.lesions)
    assert np.corrcoef(predicted, truth)[0, 1] > 0.8
    verdicts = [clf.judge(predicted[idx], patch_grades=grades[idx]).verdict for idx in test.face_patches()]
    expected = ["clear" if lab == "clear" else "acne" for lab in test.face_labels]
    assert np.mean([v == e for v, e in zip(verdicts, expected)]) >= 0.9


def test_writes_a_checkpoint_with_its_calibration_and_its_tiling(trained: tuple[Path, dict]) -> None:
    out, metrics = trained
    clf = Classifier.load(str(out))
    cfg = clf.cfg
    assert clf.sha256 == metrics["checkpoint_sha256"]
    assert 0.0 < cfg.verdict_threshold < 1.0 and cfg.verdict_threshold == metrics["validation"]["binary"]["threshold"]
    assert cfg.acne_slope > 0 and cfg.acne_slope == metrics["config"]["acne_slope"]
    assert cfg.classes == SEVERITIES and len(cfg.severity_slopes) == len(cfg.severity_bias) == 4
    # Grades are lesion-count bands: on patches that look alike, the fitted curve puts the worst
    # grade at the most lesions.
    alike = np.full((1, 4), 0.25)
    assert clf.judge(np.array([0.0]), threshold=1e-9, patch_grades=alike).severity == "mild"
    assert clf.judge(np.array([40.0]), threshold=1e-9, patch_grades=alike).severity == "very_severe"
    assert (cfg.patch_size, cfg.input_size, cfg.min_patch_skin) == (24, 24, MIN_PATCH_SKIN)
    assert cfg.training["best_epoch"] == metrics["best_epoch"] and cfg.training["complete"] is True
    assert cfg.training["args"]["seed"] == 0
    assert cfg.training["validation"]["binary"]["by_source"] == metrics["validation"]["binary"]["by_source"]


def test_two_named_datasets_are_two_sources_whatever_their_scales(tmp_path: Path) -> None:
    # Clear faces from one place, acne from another (and the same acne source at another scale):
    # the rates are reported per source, where a source-recogniser would show.
    celeb = write_patch_dataset(tmp_path / "c", {"train": {"clear": 8}, "validation": {"clear": 4}}, id_prefix="c")
    acne = write_patch_dataset(tmp_path / "a", {"train": {"mild": 4, "severe": 4}, "validation": {"mild": 2, "severe": 2}},
                               seed=1, id_prefix="a")
    half = write_patch_dataset(tmp_path / "h", {"train": {"moderate": 4}, "validation": {"moderate": 2}}, size=12,
                               seed=2, id_prefix="h")
    metrics = _train([f"celeb={celeb}", f"acne04={acne}", f"acne04@0.5={half}"], tmp_path / "ckpt",
                     "--epochs", "1", "--epoch-patches", "64")
    by_source = metrics["validation"]["binary"]["by_source"]
    assert set(by_source) == {"celeb", "acne04"}
    assert {truth: g["faces"] for truth, g in by_source["celeb"].items()} == {"clear": 4}
    assert {truth: g["faces"] for truth, g in by_source["acne04"].items()} == {"acne": 6}
    assert by_source["celeb"]["clear"]["rate_name"] == "FPR" and by_source["acne04"]["acne"]["rate_name"] == "TPR"
    training = Classifier.load(str(tmp_path / "ckpt")).cfg.training
    assert training["datasets"] == [f"celeb={celeb}", f"acne04={acne}", f"acne04@0.5={half}"]
    assert set(training["dataset_arguments"]) == {"celeb", "acne04", "acne04@0.5"}
    # Patches of two sizes: the checkpoint cannot name one patch size for scoring.
    assert Classifier.load(str(tmp_path / "ckpt")).cfg.patch_size == 0


def test_dataset_labels_are_mapped_onto_grades_and_verdicts(tmp_path: Path) -> None:
    raw = write_patch_dataset(tmp_path / "raw", {"train": {"face": 6, "0": 3, "3": 3},
                                                 "validation": {"face": 2, "0": 1, "3": 1}})
    label_map = "0->mild;1->moderate;2->severe;3->very_severe;face->clear"
    metrics = _train([str(raw)], tmp_path / "ckpt", "--epochs", "1", "--epoch-patches", "32", "--label-map", label_map)
    by_source = metrics["validation"]["binary"]["by_source"]
    assert {t: g["faces"] for t, g in by_source["raw"].items()} == {"clear": 2, "acne": 2}
    assert metrics["validation"]["severity"]["per_class"]["very_severe"]["support"] == 1
    assert Classifier.load(str(tmp_path / "ckpt")).cfg.label_map == {
        "0": "mild", "1": "moderate", "2": "severe", "3": "very_severe", "face": "clear"
    }
    with pytest.raises(ValueError, match=r"labels \['face'\] are neither grades .* map them with --label-map"):
        main([str(raw), "--output", str(tmp_path / "x"), *FAST, "--label-map", "0->mild;3->very_severe"])


def test_training_data_without_a_clear_face_is_refused(tmp_path: Path) -> None:
    data = write_patch_dataset(tmp_path / "acne_only", {"train": {"mild": 2, "severe": 2}, "validation": {"mild": 1}})
    with pytest.raises(ValueError, match="needs both clear and acne faces .*label some faces 'clear'"):
        main([str(data), "--output", str(tmp_path / "ckpt"), *FAST])
    assert not (tmp_path / "ckpt").exists()


def test_validation_without_a_clear_face_is_refused(tmp_path: Path) -> None:
    data = write_patch_dataset(tmp_path / "d", {"train": {"clear": 6, "mild": 3, "severe": 3},
                                                "validation": {"mild": 2, "severe": 2}})
    with pytest.raises(ValueError, match="validation split needs both clear and acne faces"):
        main([str(data), "--output", str(tmp_path / "ckpt"), *FAST, "--epochs", "1", "--epoch-patches", "32"])
    assert not (tmp_path / "ckpt").exists()


def test_the_severity_curve_is_fitted_on_the_named_datasets_only(mixed: Path, tmp_path: Path) -> None:
    clear_only = write_patch_dataset(tmp_path / "clear", {"train": {"clear": 4}, "validation": {"clear": 2}})
    with pytest.raises(ValueError, match=r"--severity-datasets \['elsewhere'\] are not among the datasets"):
        main([str(mixed), "--output", str(tmp_path / "x"), *FAST, "--severity-datasets", "elsewhere"])
    with pytest.raises(ValueError, match="no graded train face to fit the severity curve on"):
        main([str(mixed), f"faces={clear_only}", "--output", str(tmp_path / "y"), *FAST,
              "--severity-datasets", "faces"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_face_in_two_splits_is_refused(tmp_path: Path) -> None:
    data = write_patch_dataset(tmp_path / "d", {"train": {"clear": 2, "acne": 2}, "validation": {"acne": 1}})
    # Rename the validation face so that it collides with a training face.
    part = data / "patches" / "validation" / "part-00000.parquet"
    table = pq.read_table(part)
    table = table.set_column(0, "image_id", pc.replace_substring(table["image_id"], "validation", "train"))
    pq.write_table(table, part)
    with pytest.raises(ValueError, match="face 'train-acne-0' has patches in splits 'train' and 'validation'"):
        main([str(data), "--output", str(tmp_path / "ckpt"), *FAST])


def test_recalibrating_at_another_input_size_is_refused(mixed: Path, tmp_path: Path) -> None:
    save_untrained_classifier(str(tmp_path / "init"), input_size=32)
    with pytest.raises(ValueError, match="has input_size 32 but this run uses 24; pass --input-size 32"):
        main([str(mixed), "--output", str(tmp_path / "ckpt"), *FAST, "--init", str(tmp_path / "init"),
              "--epochs", "0"])
    assert not (tmp_path / "ckpt").exists()


def test_a_warm_start_fine_tunes_to_another_input_size(trained: tuple[Path, dict], mixed: Path,
                                                       tmp_path: Path) -> None:
    # One short, gentle epoch at 32 px cannot learn the task anew: it keeps what was learnt at 24 px.
    metrics = _train([str(mixed)], tmp_path / "ckpt", "--init", str(trained[0]), "--input-size", "32",
                     "--epochs", "1", "--epoch-patches", "32", "--lr", "1e-5")
    assert metrics["config"]["input_size"] == 32
    assert metrics["validation"]["binary"]["macro_f1"] >= 0.9


def test_zero_epochs_from_a_trained_checkpoint_only_recalibrates(trained: tuple[Path, dict], mixed: Path,
                                                                tmp_path: Path) -> None:
    ckpt, metrics = trained
    refit = _train([str(mixed)], tmp_path / "refit", "--init", str(ckpt), "--epochs", "0")
    assert [row["epoch"] for row in refit["history"]] == [0]
    assert refit["validation"]["binary"]["macro_f1"] == metrics["validation"]["binary"]["macro_f1"]
    assert refit["config"]["verdict_threshold"] == pytest.approx(metrics["config"]["verdict_threshold"])


def test_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("NAME=", "@0.5", "--label-map", "--classes", "--epoch-patches", "--source-weight", "--count-weight",
                 "--init", "--seed", "--input-size", "--threads"):
        assert flag in text, flag


def test_the_verdict_calibration_discounts_counts_spread_over_more_skin() -> None:
    # Clear portraits: 30 patches of texture adding up to ~3 false lesions. Acne close-ups: 6
    # patches with 3 true lesions or more. By the count alone the two overlap; skin tells them apart.
    rng = np.random.default_rng(0)
    clear_totals, acne_totals = rng.gamma(6.0, 0.5, 200), 2.0 + rng.gamma(2.0, 1.0, 200)
    totals = np.concatenate([clear_totals, acne_totals])
    patches = np.concatenate([rng.integers(24, 36, 200), rng.integers(4, 9, 200)]).astype(float)
    y = np.repeat([0, 1], 200)
    sources = ["portraits"] * 200 + ["close-ups"] * 200
    slope, patches_slope, bias = fit_acne_calibration(totals, patches, y, sources)
    assert slope > 0 and patches_slope < -1.0
    # Where more skin goes with more acne, the data cannot teach the discount: the term stays out.
    slope, patches_slope, bias = fit_acne_calibration(totals, patches[::-1].copy(), y, sources)
    assert slope > 0 and patches_slope == 0.0


def test_the_severity_curve_recovers_lesion_count_bands_of_every_width() -> None:
    # Hayashi-like bands: 0-5, 5-20, 20-50 and 50-150 lesions, and counts off by up to 30 %.
    rng = np.random.default_rng(0)
    edges = [0, 5, 20, 50, 150]
    grades = np.repeat(np.arange(4), 100)
    totals = rng.uniform(np.take(edges, grades), np.take(edges, grades + 1)) * rng.uniform(0.7, 1.3, 400)
    uninformative = np.full((400, 4), 0.25)
    cfg = _fitted_severity(totals, uninformative, grades)
    middles = [2.5, 12.0, 35.0, 100.0]
    assert [int(np.argmax(cfg.severity_probs(m, uninformative[0]))) for m in middles] == [0, 1, 2, 3]


def test_the_severity_curve_reads_the_patches_grade_outputs_where_counts_overlap() -> None:
    # Moderate and severe faces with the same spread of counts; only their patches' grade
    # outputs (noisy, but leaning to the true grade) tell them apart.
    rng = np.random.default_rng(0)
    grades = np.repeat([1, 2], 200)
    totals = rng.uniform(10, 40, 400)
    leaning = np.full((400, 4), 0.1)
    leaning[np.arange(400), grades] += rng.uniform(0.2, 0.6, 400)
    leaning /= leaning.sum(1, keepdims=True)
    cfg = _fitted_severity(totals, leaning, grades)
    predicted = np.array([int(np.argmax(cfg.severity_probs(t, g))) for t, g in zip(totals, leaning)])
    assert (predicted == grades).mean() > 0.95
    count_only = _fitted_severity(totals, np.full((400, 4), 0.25), grades)
    assert np.mean([int(np.argmax(count_only.severity_probs(t, np.full(4, 0.25)))) == g
                    for t, g in zip(totals, grades)]) < 0.7


def test_the_severity_curve_names_the_common_grade_where_a_rare_one_looks_the_same() -> None:
    # ACNE04's grades are far from equal in number. Where a few moderate faces share their counts
    # with many mild ones, calling them all moderate would be wrong more often than right.
    rng = np.random.default_rng(0)
    grades = np.repeat([0, 1], [300, 30])
    totals = np.concatenate([rng.uniform(0, 10, 300), rng.uniform(5, 10, 30)])
    uninformative = np.full((330, 4), 0.25)
    cfg = _fitted_severity(totals, uninformative, grades)
    predicted = np.array([int(np.argmax(cfg.severity_probs(t, g))) for t, g in zip(totals, uninformative)])
    assert (predicted == grades).mean() >= 0.9


def _fitted_severity(totals: np.ndarray, mean_grades: np.ndarray, grades: np.ndarray) -> ClassifierConfig:
    slopes, log_slopes, patch_weights, bias = fit_severity(totals, mean_grades, grades, 4)
    assert len(slopes) == len(log_slopes) == len(bias) == len(patch_weights) == 4
    return ClassifierConfig(severity_slopes=tuple(slopes), severity_log_slopes=tuple(log_slopes), severity_bias=tuple(bias),
                            severity_patch_weights=tuple(tuple(row) for row in patch_weights))


def test_hard_clear_patches_are_drawn_more_often_and_the_sources_keep_their_share(mixed: Path, tmp_path: Path) -> None:
    trainer = Trainer(parse_args([str(mixed), "--output", str(tmp_path / "ckpt"), *FAST, "--hard-clear-share", "0.5"]))
    clear = trainer.verdict_train[trainer.train.face] == 0
    counted = np.where(clear, 0.01, 3.0)
    hardest = np.nonzero(clear)[0][5]
    counted[hardest] = 2.0
    uniform, mined = trainer.sampling_weights(), trainer.sampling_weights(counted)
    assert mined[clear].sum() == pytest.approx(uniform[clear].sum())
    assert np.allclose(mined[~clear], uniform[~clear])
    # Half of the clear draws follow the counts: the patch that looked most like acne takes most of them.
    assert mined[hardest] > 0.5 * uniform[clear].sum() * 2.0 / counted[clear].sum()
    others = clear & (np.arange(len(clear)) != hardest)
    assert np.allclose(mined[others], mined[others][0]) and mined[others][0] < uniform[others][0]


@pytest.mark.parametrize("flag, what", [("--hard-clear-share", "the clear draws"),
                                        ("--enlarged-share", "the training patches")])
def test_a_share_outside_zero_to_one_is_refused(flag: str, what: str, mixed: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([str(mixed), "--output", str(tmp_path / "ckpt"), *FAST, flag, "1.5"])
    assert f"{flag} is a share of {what}, between 0 and 1; got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


def test_training_with_hard_clear_draws_records_the_share(mixed: Path, tmp_path: Path) -> None:
    metrics = _train([str(mixed)], tmp_path / "ckpt", "--epochs", "2", "--epoch-patches", "128", "--lr", "5e-3",
                     "--hard-clear-share", "0.5")
    assert [row["epoch"] for row in metrics["history"]] == [1, 2]
    assert Classifier.load(str(tmp_path / "ckpt")).cfg.training["args"]["hard_clear_share"] == 0.5


def test_the_threshold_spends_twice_the_allowance_on_misses_as_on_false_alarms() -> None:
    # Overlapping scores: whatever the threshold, each side makes errors. The targets allow 5 %
    # false alarms on a clear source and 10 % misses on an acne source, so the chosen threshold
    # leaves both sources using the same share of their allowance.
    clear, acne = np.linspace(0.0, 0.6, 1000), np.linspace(0.4, 1.0, 1000)
    probs = np.concatenate([clear, acne])
    y = np.repeat([0, 1], 1000)
    sources = ["portraits"] * 1000 + ["close-ups"] * 1000
    t = choose_threshold(probs, y, sources)
    false_alarms, misses = float((clear >= t).mean()), float((acne < t).mean())
    assert misses == pytest.approx(2 * false_alarms, abs=0.04)  # within a step of the 0.01 grid
    assert budget_use(probs, y, sources, t)[0] == pytest.approx(max(false_alarms / 0.05, misses / 0.10))
    # The symmetric rule (equal error rates) would sit at 0.5: this one guards the clear faces more.
    assert t > 0.5


def test_enlarged_patches_lose_their_fine_detail_and_nothing_else() -> None:
    # Pixel noise stands in for pores and stubble: an enlarged low-resolution photo has none of it.
    noise = torch.rand(32, 3, 48, 48, generator=torch.Generator().manual_seed(1)) * 255

    def detail(batch: torch.Tensor) -> float:
        return float((batch[..., 1:] - batch[..., :-1]).abs().mean())

    sharp = augment(noise, torch.Generator().manual_seed(0))
    soft = augment(noise, torch.Generator().manual_seed(0), enlarged_share=1.0)
    assert soft.shape == noise.shape and float(soft.min()) >= 0 and float(soft.max()) <= 255
    assert detail(soft) < 0.6 * detail(sharp)
    assert abs(float(soft.mean()) - float(sharp.mean())) < 0.1 * float(sharp.mean())
