"""Dataflow readiness, without a Google Cloud project: dry-run job graphs, packaging, templates.

``--dry_run=True`` makes DataflowRunner build the whole job (pipeline proto, SDK environment,
staged setup_file package) and stop before calling the service. Inputs, checkpoints and
outputs are gs:// URLs served by the GCS emulator, so the jobs' up-front checks run against a
real (loopback) store. The setup_file package is then installed into a fresh virtualenv and
imported by a process that cannot see the checkout, as a Dataflow worker would.
"""
from __future__ import annotations

import json
import re
import subprocess
import tarfile
import venv
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2

from models.segmenter import Segmenter
from pipelines import build_dataset, score
from pipelines.options import job_parser
from tests.scale_fixtures import (  # noqa: F401  (pytest fixtures)
    JOB_FLAGS,
    ROOT,
    checkpoints,
    copy_checkpoint,
    gcs_server,
    image_files,
    monkeypatch_module,
    put_files,
    python,
)

apiclient = pytest.importorskip(
    "apache_beam.runners.dataflow.internal.apiclient", reason="apache-beam[gcp] is not installed"
)

GPU_IMAGE = "us-docker.pkg.dev/my-project/acne/beam-gpu:0.1.0"
ACCELERATOR = "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"
DATAFLOW = ["--runner=DataflowRunner", "--dry_run=True", "--no_auth", "--project=acne-dry-run",
            "--region=europe-west4", "--temp_location=gs://acne-dry-run-temp/tmp", "--job_name=acne-dry-run"]
# Dataflow refuses job requests over 20 MB; a graph that does not carry the data stays far below.
MAX_GRAPH_BYTES = 1_000_000
FFHQ_ENTRIES = 70_000
LABEL_ROWS = 1_000_000
CPU_WORKERS = [f"--setup_file={ROOT / 'setup.py'}", "--sdk_location=container",
               "--machine_type=n2-highmem-4", "--max_num_workers=20"]
GPU_WORKERS = [f"--sdk_container_image={GPU_IMAGE}", "--sdk_location=container", "--machine_type=g2-standard-8",
               "--max_num_workers=4", f"--dataflow_service_options={ACCELERATOR}",
               "--experiments=no_use_multiple_sdk_containers", "--device=cuda"]
BUILD_STAGES = {"Read", "Decode", "Segment", "FilterFaces", "Split", "CutPatches", "EncodePatches",
                "WriteTrainPatches", "WriteValidationPatches", "WriteTestPatches", "WriteOutcomes"}
SCORE_STAGES = {"Read", "Decode", "Segment", "FilterFaces", "CutPatches", "Classify", "WriteScores",
                "WritePatchScores", "WriteOutcomes"}


@pytest.fixture(scope="module")
def gcs(gcs_server: Any, checkpoints: tuple[str, str]) -> dict[str, str]:
    """Inputs and checkpoints in the GCS emulator, as a Dataflow job would find them."""
    data = gcs_server.make_bucket("dry-run-data")
    put_files(f"{data}/images", image_files(2, broken=0))
    put_files(data, {"labels.csv": b"image_id,label\n00000,0\n00001,1\n"})
    copy_checkpoint(checkpoints[0], f"{data}/models/segmenter")
    copy_checkpoint(checkpoints[1], f"{data}/models/classifier")
    return {"root": data, "segmenter": f"{data}/models/segmenter", "classifier": f"{data}/models/classifier"}


def dry_run(job: Any, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run ``job.run(argv)`` on DataflowRunner in dry-run mode; return the job it would submit.

    The jobs' last step waits for the job and writes the manifest; a dry run has no job, so that
    step is replaced by one that hands back what the runner built.
    """
    built: list[Any] = []
    monkeypatch.setattr(job, "complete", lambda result, *args: built.append(result.job))
    job.run(argv)
    assert len(built) == 1
    return built[0]


def top_level_stages(job: Any) -> set[str]:
    """Names of the job's top-level transforms (the stages in the Dataflow UI)."""
    components = job.proto_pipeline.components
    roots = job.proto_pipeline.root_transform_ids
    names = set()
    for root in roots:
        for sub in components.transforms[root].subtransforms or [root]:
            names.add(components.transforms[sub].unique_name)
    return names


def worker_environment(job: Any) -> Any:
    """The Dataflow ``Environment`` proto the client would send: worker pools, service options..."""
    return apiclient.Environment(
        packages=[], options=job.options, environment_version="dry-run",
        proto_pipeline_staged_url="gs://acne-dry-run-temp/pipeline.pb", proto_pipeline=job.proto_pipeline,
    ).proto


def docker_environments(job: Any) -> list[tuple[str, list[Any]]]:
    """(container image, staged artifacts) of each SDK environment in the job."""
    found = []
    for env in job.proto_pipeline.components.environments.values():
        if env.urn == common_urns.environments.DOCKER.urn:
            image = beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image
            found.append((image, list(env.dependencies)))
    return found


def staged_files(artifacts: list[Any]) -> dict[str, str]:
    """{staged name: local path} of an environment's file artifacts."""
    staged = {}
    for artifact in artifacts:
        if artifact.type_urn == common_urns.artifact_types.FILE.urn:
            path = beam_runner_api_pb2.ArtifactFilePayload.FromString(artifact.type_payload).path
            name = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(artifact.role_payload).staged_name
            staged[name] = path
    return staged


@pytest.fixture(scope="module")
def cpu_build_job(gcs: dict[str, str]) -> Iterator[Any]:
    """build_dataset, dry-run for CPU workers with --setup_file (shared: staging builds an sdist)."""
    with pytest.MonkeyPatch.context() as mp:
        argv = ["--input", f"{gcs['root']}/images", "--output", f"{gcs['root']}/out/cpu",
                "--segmenter-checkpoint", gcs["segmenter"], "--labels-csv", f"{gcs['root']}/labels.csv",
                "--labels", "team=acne", *JOB_FLAGS, *DATAFLOW, *CPU_WORKERS]
        yield dry_run(build_dataset, argv, mp)


def test_build_dataset_graph_for_cpu_workers(cpu_build_job: Any) -> None:
    assert BUILD_STAGES <= top_level_stages(cpu_build_job)
    env = worker_environment(cpu_build_job)
    pool = env.worker_pools[0]
    assert pool.machine_type == "n2-highmem-4"
    assert pool.autoscaling_settings.max_num_workers == 20
    assert not list(env.service_options)
    [(image, artifacts)] = docker_environments(cpu_build_job)
    assert image.endswith("/beam_python3.11_sdk:2.77.0"), image
    assert "workflow.tar.gz" in staged_files(artifacts), "the --setup_file package is not staged"
    # Beam's --labels labels the Dataflow job; the job's own label file is --labels-csv.
    assert dict(cpu_build_job.proto.labels) == {"team": "acne"}


def ffhq_metadata_json(entries: int) -> bytes:
    """An ``ffhq-dataset-v2.json`` of ``entries`` faces, shaped like the real one (68 landmarks each).

    Coordinates are random, as real ones are: Beam compresses the pickled graph, so repeated
    values would hide how big data inside it gets.
    """
    coords = np.random.default_rng(0).integers(0, 102_400, size=(entries, 68, 2)) / 100
    categories = ("training", "validation")
    body = ",".join(
        f'"{i}": {{"category": "{categories[i % 10 == 0]}", "metadata": {{"license": "cc"}}, '
        f'"image": {{"file_path": "images1024x1024/{i // 1000 * 1000:05d}/{i:05d}.png", '
        f'"pixel_size": [1024, 1024], "face_landmarks": {json.dumps(coords[i].tolist())}}}}}'
        for i in range(entries)
    )
    return ("{" + body + "}").encode()


@pytest.fixture(scope="module")
def large_side_files(gcs: dict[str, str]) -> dict[str, str]:
    """A full-size FFHQ metadata file and a million-row label file in the emulator bucket."""
    grades = np.random.default_rng(1).integers(0, 4, size=LABEL_ROWS)
    rows = "".join(f"images/{i * 2654435761 % 2**32:08x}.jpg,{grade}\n" for i, grade in enumerate(grades))
    put_files(gcs["root"], {
        "large/ffhq-dataset-v2.json": ffhq_metadata_json(FFHQ_ENTRIES),
        "large/labels.csv": ("image_id,label\n" + rows).encode(),
    })
    return {"ffhq": f"{gcs['root']}/large/ffhq-dataset-v2.json", "labels": f"{gcs['root']}/large/labels.csv"}


def test_graph_size_does_not_grow_with_the_side_files(
    gcs: dict[str, str], large_side_files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Labels and FFHQ metadata reach the workers by URI: the job request stays small whatever their size."""
    argv = ["--input", f"{gcs['root']}/images", "--output", f"{gcs['root']}/out/large-side-files",
            "--segmenter-checkpoint", gcs["segmenter"], "--labels-csv", large_side_files["labels"],
            "--ffhq-metadata", large_side_files["ffhq"], "--split", "ffhq", *JOB_FLAGS, *DATAFLOW, *CPU_WORKERS]
    built = dry_run(build_dataset, argv, monkeypatch)
    # The steps travel in the pipeline proto (the Job request itself holds none on Runner v2).
    size = len(built.proto_pipeline.SerializeToString())
    print(f"serialised pipeline proto: {size} bytes")
    assert size < MAX_GRAPH_BYTES, size


@pytest.mark.parametrize("job", ["build_dataset", "score"])
def test_graph_for_gpu_workers(job: str, gcs: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """--device cuda on GPU workers launches from a machine without a GPU, with the accelerator options."""
    argv = ["--input", f"{gcs['root']}/images", "--output", f"{gcs['root']}/out/gpu-{job}",
            "--segmenter-checkpoint", gcs["segmenter"], *JOB_FLAGS, *DATAFLOW, *GPU_WORKERS]
    if job == "score":
        argv += ["--classifier-checkpoint", gcs["classifier"], "--patch-table"]
    built = dry_run(build_dataset if job == "build_dataset" else score, argv, monkeypatch)

    assert (BUILD_STAGES if job == "build_dataset" else SCORE_STAGES) <= top_level_stages(built)
    env = worker_environment(built)
    assert ACCELERATOR in env.service_options
    assert env.worker_pools[0].machine_type == "g2-standard-8"
    assert env.worker_pools[0].autoscaling_settings.max_num_workers == 4
    assert "no_use_multiple_sdk_containers" in env.experiments
    assert [image for image, _ in docker_environments(built)] == [GPU_IMAGE]


@pytest.fixture(scope="module")
def worker_site(cpu_build_job: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A fresh virtualenv with the staged package installed: (its python, its site-packages).

    Third-party dependencies come from the project venv's site-packages through a plain path
    entry (not a site dir, so the checkout's editable-install hook there stays inert); the
    project itself only from the staged sdist.
    """
    [(_, artifacts)] = docker_environments(cpu_build_job)
    sdist = Path(staged_files(artifacts)["workflow.tar.gz"])
    root = tmp_path_factory.mktemp("worker")
    venv.create(root / "venv", with_pip=False)
    worker_python = root / "venv" / "bin" / "python"
    site = Path(subprocess.check_output(
        [str(worker_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True,
    ).strip())
    deps = subprocess.check_output([python(), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   text=True).strip()
    (site / "project_dependencies.pth").write_text(deps + "\n")
    subprocess.run(
        [python(), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(sdist)],
        check=True, cwd=root, capture_output=True,
    )
    return worker_python, site


def test_setup_file_package_installs_and_imports_on_a_worker(worker_site: tuple[Path, Path], tmp_path: Path) -> None:
    worker_python, site = worker_site
    probe = """
import json, os, sys
import pipelines.build_dataset, pipelines.score, transforms.read, transforms.sink, transforms.finish
from models import defaults
print(json.dumps({"pipelines": pipelines.build_dataset.__file__, "defaults": defaults.__file__,
                  "checkout_on_path": any(os.path.abspath(p or ".") == %r for p in sys.path)}))
""" % str(ROOT)
    out = subprocess.run([str(worker_python), "-c", probe], cwd=tmp_path, env={"PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["pipelines"].startswith(str(site)) and found["defaults"].startswith(str(site))
    assert not found["checkout_on_path"]


def test_default_checkpoints_ship_inside_the_package(worker_site: tuple[Path, Path], tmp_path: Path) -> None:
    shipped_here = sorted(p.relative_to(ROOT / "models" / "defaults").as_posix()
                          for p in (ROOT / "models" / "defaults").glob("*/*")
                          if p.suffix in (".json", ".safetensors", ".md"))
    if not shipped_here:
        pytest.skip("no default checkpoint has been trained into models/defaults yet")
    worker_python, site = worker_site
    installed = sorted(p.relative_to(site / "models" / "defaults").as_posix()
                       for p in (site / "models" / "defaults").glob("*/*"))
    assert set(shipped_here) <= set(installed)
    if "segmenter/config.json" in shipped_here:
        probe = "from models import defaults; from models.segmenter import Segmenter; " \
                "print(Segmenter.load(defaults.SEGMENTER).sha256)"
        out = subprocess.run([str(worker_python), "-c", probe], cwd=tmp_path, env={"PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.split()[-1] == Segmenter.load(str(ROOT / "models" / "defaults" / "segmenter")).sha256


@pytest.mark.parametrize("job", ["build_dataset", "score"])
def test_flex_template_parameters_are_the_cli_flags(job: str) -> None:
    spec = json.loads((ROOT / "templates" / f"{job}.metadata.json").read_text())
    module = build_dataset if job == "build_dataset" else score
    parser = job_parser(module.OPTION_GROUPS, module.PROG, module.DESCRIPTION)
    actions = {a.option_strings[0][2:]: a for a in parser._actions if a.option_strings}
    names = [p["name"] for p in spec["parameters"]]
    assert len(names) == len(set(names))
    for param in spec["parameters"]:
        assert param["name"] in actions, f"{param['name']} is not a flag of {job}"
        assert param["helpText"] and param["label"]
        # A Flex Template passes every parameter as --name=value: flags that take no value cannot be one.
        assert actions[param["name"]].nargs != 0, f"--{param['name']} takes no value"
        if actions[param["name"]].choices and param.get("paramType") == "ENUM":
            assert {o["value"] for o in param["enumOptions"]} == {str(c) for c in actions[param["name"]].choices}
        # A default quoted in the template's help must be the flag's real default.
        quoted = re.search(r"\(default: ([^);]+)", param["helpText"])
        default = actions[param["name"]].default
        if quoted and isinstance(default, (int, float, str)) and not str(default).startswith("/"):
            assert quoted.group(1) == str(default), f"--{param['name']}: template says {quoted.group(1)}, flag {default}"
    required = {p["name"] for p in spec["parameters"] if not p.get("isOptional", False)}
    assert required == {"input", "output"}
    # Every value-taking job flag is offered, so the template is not a reduced job.
    offered = {n for n, a in actions.items() if a.nargs != 0 and n != "help"}
    assert offered <= set(names), f"flags missing from the template: {sorted(offered - set(names))}"


def test_gpu_container_recipe_is_built_on_the_beam_sdk_boot() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    assert "COPY --from=apache/beam_python3.11_sdk:2.77.0 /opt/apache/beam /opt/apache/beam" in dockerfile
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in dockerfile
    assert "torch==2.14.1" in dockerfile


def test_sdist_contains_the_packages(cpu_build_job: Any) -> None:
    [(_, artifacts)] = docker_environments(cpu_build_job)
    with tarfile.open(staged_files(artifacts)["workflow.tar.gz"]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert {"pipelines/build_dataset.py", "pipelines/score.py", "transforms/read.py", "models/checkpoint.py",
            "setup.py"} <= names
    # Workers load the shipped checkpoints from the package, the classifier's severity network too.
    assert {f"models/defaults/classifier/{sub}{name}" for sub in ("", "severity/")
            for name in ("config.json", "weights.safetensors")} <= names
