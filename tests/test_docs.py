"""The README documents what the code does: every flag of both jobs, and the two commands."""
from __future__ import annotations

import pytest

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
