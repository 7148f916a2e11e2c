"""The README documents what the code does: every flag of both jobs, and the two commands."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import duckdb
import pytest

from models.dataset import ERRORS_DIR, SCORES_DIR, read_manifest, read_patches, read_table
from pipelines import build_dataset, score
from pipelines.options import job_parser
from tests.conftest import REPO


@pytest.mark.parametrize("job", [build_dataset, score], ids=["build_dataset", "score"])
def test_readme_documents_every_flag(job) -> None:
    readme = (REPO / "README.md").read_text()
    flags = {
        option
        for action in job_parser(job.OPTION_GROUPS, job.PROG, job.DESCRIPTION)._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }
    missing = sorted(f for f in flags if f"`{f}" not in readme)
    assert not missing, f"flags missing from README.md: {missing}"


def test_readme_names_the_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (REPO / "README.md").read_text()
    assert "./run_local.sh" in readme and "./run_tests.sh" in readme
    assert "./run_tests.sh" in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("job", [build_dataset, score], ids=["build_dataset", "score"])
def test_help_groups_the_flags_by_stage_and_ends_with_examples_that_parse(job) -> None:
    parser = job_parser(job.OPTION_GROUPS, job.PROG, job.DESCRIPTION, job.EXAMPLES)
    text = parser.format_help()
    expected = ["input", "segmentation", "patches", *(["scoring"] if job is score else []), "output"]
    headings = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert headings == ["options", *expected, "Beam flags", "examples"]
    ungrouped = [a for a in parser._action_groups if a.title == "options"][0]._group_actions
    assert [a.dest for a in ungrouped] == ["help"], "every job flag sits in a stage's section"
    examples = text.split("\nexamples:\n")[1]
    commands = [" ".join(shlex.split(c, comments=True)) for c in examples.replace("\\\n", " ").splitlines()]
    assert len(commands) >= 3 and all(c.startswith(job.PROG + " ") for c in commands)
    for command in commands:
        flags, _ = parser.parse_known_args(shlex.split(command)[len(job.PROG.split()):])
        assert flags.input and flags.output, command


def test_readme_duckdb_queries_answer_right_on_real_outputs(sample_output: Path, sample_score_output: Path) -> None:
    readme = (REPO / "README.md").read_text()
    queries = {
        block.splitlines()[0]: block.replace("runs/local/dataset", str(sample_output))
        .replace("runs/local/scores", str(sample_score_output))
        for block in re.findall(r"```sql\n(.*?)```", readme, re.S)
    }
    assert len(queries) == 3
    per_split, top, failures = (duckdb.sql(q).fetchall() for q in queries.values())

    patches = read_patches(str(sample_output), columns=["split", "image_id", "skin_fraction"]).to_pandas()
    assert [(split, n) for split, n, *_ in per_split] == sorted(patches.split.value_counts().items())
    assert [(split, faces) for split, _, faces, _ in per_split] == sorted(
        patches.groupby("split").image_id.nunique().items())
    assert all(0.5 <= skin <= 1 for *_, skin in per_split)

    scores = read_table(str(sample_score_output), SCORES_DIR).to_pandas().query("status == 'scored'")
    expected = scores.sort_values(["lesion_count", "image_id"], ascending=[False, True]).image_id.head(50)
    assert [row[0] for row in top] == expected.tolist() and {row[1] for row in top} <= {"clear", "acne"}

    errors = read_table(str(sample_output), ERRORS_DIR).to_pandas()
    assert sum(n for _, _, n, _ in failures) == read_manifest(str(sample_output))["accounting"]["failed"] == len(errors)
    assert [(stage, kind) for stage, kind, *_ in failures] == sorted(
        errors.groupby(["stage", "error_type"]).groups)
