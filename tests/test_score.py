"""score end to end: one row per image with a verdict, and nothing silently dropped."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import apache_beam as beam
import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.pipeline import PipelineVisitor
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from models.classifier import SEVERITIES
from models.dataset import FACES_DIR, PATCH_SCORES_DIR, SCORES_DIR, read_table
from pipelines import build_dataset
from pipelines.common import JobConfigError
from pipelines.score import run
from transforms.read_patches import PatchRows, ReadPatchDataset, patch_files, plan_faces

# Tiny thresholds are valid probabilities; under the untrained classifier's calibration every
# face's acne probability is above this one (and below its own 0.5).
LAX = "0.000000001"


def _config(manifest: dict) -> dict:
    return json.loads((Path(manifest["checkpoints"]["classifier"]["uri"]) / "config.json").read_text())


@pytest.fixture(scope="module")
def sample_scores(sample_dir: Path, untrained_classifier: str,
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("score") / "scores"
    manifest = run(["--input", str(sample_dir), "--output", str(out), "--patch-table",
                    "--classifier-checkpoint", untrained_classifier, "--torch-threads", "1"])
    return out, manifest


@pytest.fixture(scope="module")
def sample_dataset(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dataset") / "dataset"
    return out, build_dataset.run(["--input", str(sample_dir), "--output", str(out), "--torch-threads", "1"])


def test_every_readable_image_gets_a_row_and_failures_get_reasons(sample_scores) -> None:
    out, manifest = sample_scores
    books = manifest["accounting"]
    assert books["ok"] and books["inputs"] == 7 and books["failed"] == 2
    scores = read_table(str(out), SCORES_DIR).to_pandas()
    assert sorted(scores.image_id) == ["00000", "00001", "00002", "00003", "00004"]
    assert set(scores.status) <= {"scored", "no_skin"} and (scores.status == "scored").sum() >= 3
    skinless = scores[scores.status == "no_skin"]
    assert (skinless.patches_used == 0).all() and skinless.reason.str.contains("skin").all()
    assert skinless.verdict.isna().all() and skinless.acne_probability.isna().all()
    errors = read_table(str(out), "errors").to_pandas()
    assert sorted(errors.image_id) == ["00005", "00006"]
    faces = read_table(str(out), FACES_DIR).to_pandas()
    assert len(faces) == 7 and faces.image_id.is_unique


def test_scored_rows_carry_the_verdict_probabilities_top_patches_and_both_hashes(sample_scores) -> None:
    out, manifest = sample_scores
    table = read_table(str(out), SCORES_DIR)
    assert "predicted_class" not in table.column_names
    classes = _config(manifest)["classes"]
    lesions = read_table(str(out), PATCH_SCORES_DIR).to_pandas().groupby("image_id").lesions
    scored = [r for r in table.to_pylist() if r["status"] == "scored"]
    assert scored
    for row in scored:
        # The untrained classifier's calibration calls every face clear.
        assert row["verdict"] == "clear" and row["severity"] is None
        assert 0 < row["acne_probability"] < 0.5
        assert row["lesion_count"] == pytest.approx(lesions.sum()[row["image_id"]], rel=1e-4)
        probs = {p["name"]: p["probability"] for p in row["probabilities"]}
        assert list(probs) == ["clear", *classes] and abs(sum(probs.values()) - 1) < 1e-4
        assert probs["clear"] == pytest.approx(1 - row["acne_probability"], abs=1e-6)
        assert 1 <= len(row["top_patches"]) <= 3 and row["patches_used"] >= len(row["top_patches"])
        assert all(0 <= p["x"] <= 1024 - p["size"] and 0 <= p["y"] <= 1024 - p["size"] for p in row["top_patches"])
        top = [p["score"] for p in row["top_patches"]]
        assert top == sorted(top, reverse=True) and top[0] == pytest.approx(lesions.max()[row["image_id"]], rel=1e-5)
        assert row["segmenter_sha256"] == manifest["checkpoints"]["segmenter"]["sha256"]
        assert row["classifier_sha256"] == manifest["checkpoints"]["classifier"]["sha256"]


def test_the_report_shows_the_verdicts(sample_scores) -> None:
    out, _ = sample_scores
    # Three panels (outcomes, skin, verdicts); build_dataset's report has two.
    assert Image.open(out / "report.png").size[0] > 1400


def test_patches_are_cut_as_the_classifier_saw_them_unless_flags_say_otherwise(
        sample_scores, sample_dir: Path, untrained_classifier: str, tmp_path: Path) -> None:
    _, manifest = sample_scores
    trained = _config(manifest)
    assert (trained["patch_size"], trained["min_patch_skin"]) == (128, 0.4)
    # No tiling flag given: patches are cut, and stepped, as the classifier's were in training.
    assert (manifest["arguments"]["patch_size"], manifest["arguments"]["min_patch_skin"]) == (128, 0.4)
    assert manifest["arguments"]["stride"] == 128
    chosen = run(["--input", str(sample_dir / "00000" / "00000.png"), "--output", str(tmp_path / "out"),
                  "--classifier-checkpoint", untrained_classifier,
                  "--patch-size", "256", "--min-patch-skin", "0.9", "--min-face-skin", "0.3"])
    args = chosen["arguments"]
    assert (args["patch_size"], args["min_patch_skin"], args["min_face_skin"]) == (256, 0.9, 0.3)


def test_score_judges_faces_with_less_skin_than_build_dataset_keeps(sample_scores, sample_dataset) -> None:
    # A small face in a wide photo still gets a verdict; a training dataset wants skin-filled faces.
    assert sample_scores[1]["arguments"]["min_face_skin"] == 0.02
    assert sample_dataset[1]["arguments"]["min_face_skin"] == 0.15


def test_patch_table_holds_every_scored_patch(sample_scores) -> None:
    out, _ = sample_scores
    scores = read_table(str(out), SCORES_DIR).to_pandas()
    patches = read_table(str(out), PATCH_SCORES_DIR).to_pandas()
    assert "lesions" in patches.columns and "probabilities" not in patches.columns
    assert patches.groupby("image_id").size().to_dict() == scores[scores.status == "scored"].set_index(
        "image_id").patches_used.to_dict()
    assert patches.patch_id.is_unique and (patches.lesions >= 0).all()
    # 128 working pixels, given in the source's pixels: 256 where the photo was halved.
    scale = patches.image_id.map(scores.set_index("image_id").working_scale)
    assert ((patches["size"] == (128 / scale).round()) & (patches.skin_fraction >= 0.4)).all()


def test_enlarged_photos_are_scored_at_half_size_and_outlined_in_their_own_pixels(
        sample_scores, sample_dir: Path, untrained_classifier: str, tmp_path: Path) -> None:
    out, manifest = sample_scores
    assert manifest["arguments"]["working_resolution"] == "auto"
    scores = read_table(str(out), SCORES_DIR).to_pandas().set_index("image_id")
    # The sample's four portraits are 1024x1024 crops enlarged 3-5x from photos of 512-600 px.
    portraits = scores.loc[["00000", "00001", "00002", "00003"]]
    assert (portraits.working_scale == 0.5).all()
    astronaut = portraits.loc["00001"]
    assert all(p["size"] == 256 and p["x"] + 256 <= 1024 and p["y"] + 256 <= 1024 for p in astronaut.top_patches)
    native = run(["--input", str(sample_dir / "00000" / "00001.png"), "--output", str(tmp_path / "native"),
                  "--classifier-checkpoint", untrained_classifier, "--working-resolution", "native"])
    assert native["arguments"]["working_resolution"] == "native"
    [row] = read_table(str(tmp_path / "native"), SCORES_DIR).to_pylist()
    # At its full size the same face spans four times the patches.
    assert row["working_scale"] == 1.0 and all(p["size"] == 128 for p in row["top_patches"])
    assert row["patches_used"] > 2 * astronaut.patches_used


def test_wrong_classifier_checkpoint_fails_before_any_work(tmp_path: Path, sample_dir: Path,
                                                           segmenter_checkpoint: str) -> None:
    wrong = tmp_path / "wrong"
    shutil.copytree(segmenter_checkpoint, wrong)
    with pytest.raises(JobConfigError, match="'segmenter' checkpoint, but a 'classifier' checkpoint is needed"):
        run(["--input", str(sample_dir), "--output", str(tmp_path / "out"), "--classifier-checkpoint", str(wrong)])
    assert not (tmp_path / "out").exists()


def test_an_invalid_verdict_threshold_is_refused(tmp_path: Path, sample_dir: Path) -> None:
    for bad in ("1.5", "0", "1"):
        with pytest.raises(SystemExit):
            run(["--input", str(sample_dir), "--output", str(tmp_path / "out"), "--verdict-threshold", bad])
    assert not (tmp_path / "out").exists()


def test_an_existing_patch_dataset_is_rescored_without_resegmenting_and_resumed(
        sample_dataset, untrained_classifier: str, tmp_path: Path) -> None:
    dataset, built = sample_dataset
    manifest = run(["--input", str(dataset), "--output", str(tmp_path / "scores"),
                    "--classifier-checkpoint", untrained_classifier])
    scores = read_table(str(tmp_path / "scores"), SCORES_DIR).to_pandas()
    kept = read_table(str(dataset), FACES_DIR).to_pandas().query("status == 'kept'")
    assert sorted(scores.image_id) == sorted(kept.image_id) and (scores.status == "scored").all()
    assert scores.set_index("image_id").patches_used.to_dict() == kept.set_index("image_id").patch_count.to_dict()
    assert manifest["checkpoints"]["segmenter"] == built["checkpoints"]["segmenter"]
    assert (scores.verdict == "clear").all()

    again = run(["--input", str(dataset), "--output", str(tmp_path / "scores"),
                 "--classifier-checkpoint", untrained_classifier, "--resume"])
    assert again["runs"][1]["carried_images"] == manifest["accounting"]["inputs"] == again["accounting"]["inputs"]
    assert again["runs"][1]["files"] == [] and again["accounting"]["ok"]
    assert read_table(str(tmp_path / "scores"), SCORES_DIR).to_pandas().equals(scores)


def test_rescoring_shuffles_row_refs_and_reads_image_bytes_only_after_grouping(
        sample_dataset, tmp_path: Path, pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset, _ = sample_dataset
    copy = tmp_path / "dataset"
    shutil.copytree(dataset, copy)
    # Row groups of 5 rows cut faces apart: some faces need two groups.
    for path in (copy / "patches").rglob("*.parquet"):
        pq.write_table(pq.read_table(path), path, row_group_size=5, compression="none")
    table = pa.concat_tables(pq.read_table(f) for f in sorted((copy / "patches").rglob("*.parquet")))
    reads: list[tuple[str, ...]] = []
    real = pq.ParquetFile.read_row_group

    def counted(self: pq.ParquetFile, i: int, columns: list[str], **kwargs) -> pa.Table:
        reads.append(tuple(columns))
        return real(self, i, columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)

    planned = [ref for uri in patch_files(str(copy)) for ref in plan_faces(uri)]
    assert set(reads) == {("image_id",)}, "planning reads the ids alone, never an image or mask"
    groups = len(reads)
    spanning = len(planned) - len({image_id for image_id, _ in planned})
    assert spanning > 0 and all(isinstance(ref, PatchRows) for _, ref in planned)

    reads.clear()
    with pipeline() as p:
        faces, failed, inputs = p | ReadPatchDataset(str(copy))
        assert_that(faces | beam.Map(lambda r: (r.image_id, r.split, tuple((q.x, q.y) for q in r.patches))),
                    equal_to(_faces_of(table.to_pylist())), label="faces")
        assert_that(failed, equal_to([]), label="failed")
        assert_that(inputs, equal_to([len(set(table.column("image_id").to_pylist()))]), label="inputs")
    # What goes through both shuffles is declared as row refs, and a ref holds no bytes.
    shuffled = {node.full_label.rsplit("/", 1)[-1]: str(node.inputs[0].element_type) for node in _group_by_keys(p)}
    for label in ("GroupByFace", "GroupByRowGroup"):
        assert "PatchRows" in shuffled[label] and "Any" not in shuffled[label], shuffled[label]
    assert [f.type for f in dataclasses.fields(PatchRows)] == ["str", "int", "tuple[int, ...]"]
    patch_reads = [columns for columns in reads if "image" in columns]
    assert reads.count(("image_id",)) == groups and len(reads) == groups + len(patch_reads)
    assert groups <= len(patch_reads) <= groups + spanning, "each row group is read once, twice at most for a cut face"


def _faces_of(rows: list[dict]) -> list[tuple]:
    by_face: dict[str, list[dict]] = {}
    for row in rows:
        by_face.setdefault(row["image_id"], []).append(row)
    return [(i, rs[0]["split"], tuple((r["x"], r["y"]) for r in sorted(rs, key=lambda r: (r["y"], r["x"]))))
            for i, rs in by_face.items()]


def _group_by_keys(p: beam.Pipeline) -> list:
    nodes = []

    class Visitor(PipelineVisitor):
        def visit_transform(self, node) -> None:
            if isinstance(node.transform, beam.GroupByKey):
                nodes.append(node)

        enter_composite_transform = visit_transform

    p.visit(Visitor())
    return nodes


def test_a_verdict_threshold_changes_the_verdicts(
        sample_dataset, untrained_classifier: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset, _ = sample_dataset
    manifest = run(["--input", str(dataset), "--output", str(tmp_path / "scores"),
                    "--classifier-checkpoint", untrained_classifier, "--verdict-threshold", LAX])
    assert manifest["arguments"]["verdict_threshold"] == float(LAX)
    rows = read_table(str(tmp_path / "scores"), SCORES_DIR).to_pylist()
    assert rows and all(r["verdict"] == "acne" and r["severity"] in SEVERITIES for r in rows)
    # The threshold moves the verdict, not the probabilities: they still say "clear" is likely.
    assert all(r["acne_probability"] < 0.5 and r["probabilities"][0]["name"] == "clear"
               and r["probabilities"][0]["probability"] > 0.5 for r in rows)
    assert f"verdicts: acne {len(rows)}, no usable skin 0" in capsys.readouterr().out


def test_a_bundled_severity_network_grades_the_acne_faces(sample_dataset, untrained_classifier: str,
                                                          tmp_path: Path) -> None:
    from models.classifier.bundle import bundle
    from tests.classifier_data import save_untrained_classifier

    grader = str(tmp_path / "grader")
    save_untrained_classifier(grader, patch_size=128, min_patch_skin=0.4, severity_slopes=(0.0,) * 4,
                              severity_patch_weights=(), severity_bias=(0.0, 0.0, 0.0, 9.0))
    sha = bundle(untrained_classifier, grader, str(tmp_path / "bundle"))
    dataset, _ = sample_dataset
    manifest = run(["--input", str(dataset), "--output", str(tmp_path / "scores"),
                    "--classifier-checkpoint", str(tmp_path / "bundle"), "--verdict-threshold", LAX])
    rows = read_table(str(tmp_path / "scores"), SCORES_DIR).to_pylist()
    assert rows and all(r["verdict"] == "acne" and r["severity"] == "very_severe" for r in rows)
    assert {r["classifier_sha256"] for r in rows} == {sha} == {manifest["checkpoints"]["classifier"]["sha256"]}


# Real photographs, judged by the shipped classifier (skipped without ../shared/data).


def _acne04(shared_data: Path, pattern: str, n: int) -> list[Path]:
    photos = sorted((shared_data / "acne" / "acne04" / "valid").glob(pattern))[:n]
    if len(photos) < n:
        pytest.skip(f"fewer than {n} ACNE04 photos {pattern} under {shared_data}")
    return photos


def _celebahq(shared_data: Path, n: int) -> list[Path]:
    photos = sorted((shared_data / "faces" / "celebahq").glob("*.jpg"))[:n]
    if len(photos) < n:
        pytest.skip(f"fewer than {n} CelebA-HQ faces under {shared_data}")
    return photos


def _verdicts(inputs: list[Path], out: Path) -> dict[str, tuple]:
    manifest = run(["--input", *map(str, inputs), "--output", str(out)])
    rows = read_table(str(out), SCORES_DIR).to_pylist()
    assert manifest["accounting"]["ok"] and len(rows) == len(inputs)
    return {r["image_id"]: (r["status"], r["verdict"], r["severity"]) for r in rows}


def test_real_acne04_photos_are_acne_and_clear_faces_are_clear(shared_data: Path, tmp_path: Path) -> None:
    acne = _acne04(shared_data, "levle3_*.jpg", 2) + _acne04(shared_data, "levle2_*.jpg", 1)
    clear = _celebahq(shared_data, 3)
    got = _verdicts(acne + clear, tmp_path / "out")
    for photo in acne:
        status, verdict, severity = got[photo.stem]
        assert (status, verdict) == ("scored", "acne") and severity in SEVERITIES, (photo.name, got[photo.stem])
    for photo in clear:
        assert got[photo.stem] == ("scored", "clear", None), (photo.name, got[photo.stem])


def _on_grey(rgb: np.ndarray, scale: float) -> np.ndarray:
    """The photo shrunk by ``scale`` in the middle of a neutral grey canvas of its own size."""
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    canvas = np.full_like(rgb, 128)
    y, x = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    canvas[y:y + small.shape[0], x:x + small.shape[1]] = small
    return canvas


def test_an_acne_face_stays_acne_when_it_fills_less_of_the_photo(shared_data: Path, tmp_path: Path) -> None:
    [photo] = _acne04(shared_data, "levle3_*.jpg", 1)
    rgb = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)
    inputs = []
    for name, scale in (("full", 1.0), ("half", 1 / 2), ("third", 1 / 3)):
        path = tmp_path / "in" / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(_on_grey(rgb, scale), cv2.COLOR_RGB2BGR))
        inputs.append(path)
    got = _verdicts(inputs, tmp_path / "out")
    assert {k: v[:2] for k, v in got.items()} == {n: ("scored", "acne") for n in ("full", "half", "third")}, got


def test_a_clear_face_stays_clear_at_half_resolution(shared_data: Path, tmp_path: Path) -> None:
    [photo] = _celebahq(shared_data, 1)
    bgr = cv2.imread(str(photo))
    assert bgr.shape[:2] == (1024, 1024)
    (tmp_path / "in").mkdir()
    shutil.copy(photo, tmp_path / "in" / "full.jpg")
    cv2.imwrite(str(tmp_path / "in" / "half.png"), cv2.resize(bgr, (512, 512), interpolation=cv2.INTER_AREA))
    got = _verdicts([tmp_path / "in" / "full.jpg", tmp_path / "in" / "half.png"], tmp_path / "out")
    assert got == {"full": ("scored", "clear", None), "half": ("scored", "clear", None)}


def test_resume_scores_only_the_files_added_since_and_matches_a_one_shot_run(
    sample_dir: Path, sample_scores: tuple[Path, dict], untrained_classifier: str, tmp_path: Path
) -> None:
    files = sorted(p for p in sample_dir.rglob("*") if p.is_file())
    archive = tmp_path / "archive"
    for path in files[: len(files) // 2]:
        (archive / path.relative_to(sample_dir)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, archive / path.relative_to(sample_dir))
    argv = ["--input", str(archive), "--output", str(tmp_path / "scores"), "--patch-table",
            "--classifier-checkpoint", untrained_classifier, "--torch-threads", "1"]
    first = run(argv)
    for path in files[len(files) // 2 :]:
        (archive / path.relative_to(sample_dir)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, archive / path.relative_to(sample_dir))
    resumed = run(argv + ["--resume"])

    assert resumed["runs"][1]["carried_images"] == first["accounting"]["inputs"]
    assert resumed["accounting"]["inputs"] == len(files) and resumed["accounting"]["ok"]
    one_shot, _ = sample_scores
    columns = ["image_id", "status", "verdict", "severity", "patches_used"]
    for table, order in ((SCORES_DIR, "image_id"), (FACES_DIR, "image_id")):
        cols = columns if table == SCORES_DIR else ["image_id", "status", "stage", "patch_count"]
        mine = read_table(str(tmp_path / "scores"), table, cols).sort_by(order).to_pylist()
        assert mine == read_table(str(one_shot), table, cols).sort_by(order).to_pylist()
    patch_ids = read_table(str(tmp_path / "scores"), PATCH_SCORES_DIR, ["patch_id"]).column(0).to_pylist()
    assert sorted(patch_ids) == sorted(read_table(str(one_shot), PATCH_SCORES_DIR, ["patch_id"]).column(0).to_pylist())


def test_the_shipped_model_calls_both_sample_portraits_clear(sample_score_output: Path) -> None:
    # Grace Hopper (00000, 00002) and the astronaut (00001, 00003): photos of 512-600 px enlarged
    # 3-5x, which the classifier read as acne at their enlarged size before --working-resolution.
    rows = read_table(str(sample_score_output), SCORES_DIR).to_pandas().set_index("image_id")
    portraits = rows.loc[["00000", "00001", "00002", "00003"]]
    assert (portraits.verdict == "clear").all() and (portraits.working_scale == 0.5).all(), portraits
