"""A few seeded kill -9 points per stage (make test); `make test-faults` runs 20 a stage and prints the table.
The training stages' kill -9 resumes are also in tests/e2e/test_train_hf.py and tests/e2e/test_train_megatron.py."""
import pytest

import kill_points


@pytest.mark.parametrize("stage,points", [("tokenizer", 2), ("tokenize", 2), ("mix", 2), ("import", 1)])
def test_a_killed_stage_reruns_to_the_same_output_and_leaves_no_process(stage, points, tmp_path, capsys):
    table = kill_points.run_cases([stage], points, seed=7, work=tmp_path)
    kill_points.print_table(table)
    row = table[stage]
    assert row["tried"] == points
    assert row["completed"] == points and row["identical"] == points, capsys.readouterr()
    assert row["no_orphans"] == points, "a process of the killed driver outlived it"
