"""`dtlab exercise list`: every exercise in the course's order with its lab and page, and where
the learner's own file stands, read from what `dtlab exercise` and `dtlab check` noted (a file
changed after its check is not called passing). Runs the real CLI; one distributed-free check."""
import json

import pytest

from conftest import dtlab
from dtlab.exercises import checker, progress


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("DTLAB_STATE", str(tmp_path / "state"))
    return {"DTLAB_STATE": str(tmp_path / "state")}


def test_every_exercise_has_a_lesson_with_a_real_lab_and_page():
    from dtlab import registry
    from conftest import ROOT
    assert set(progress.BY_EXERCISE) == set(checker.EXERCISES)
    for lesson in progress.COURSE:
        assert lesson.lab in registry.LABS, lesson
        assert (ROOT / "docs" / lesson.page).is_file(), lesson


def test_list_follows_the_learner_from_skeleton_to_pass(tmp_path, state):
    p = dtlab("exercise", "list", env=state)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split("\nincidents:")[0].splitlines()  # the exercises' rows
    assert sum("not started" in ln for ln in lines) == len(checker.EXERCISES)
    assert lines.index(next(ln for ln in lines if "ring_allreduce" in ln)) < \
        lines.index(next(ln for ln in lines if "rank_grid" in ln))  # the course's order
    assert dtlab("exercise", "gpipe", "--dest", tmp_path / "my", env=state).returncode == 0
    mine = tmp_path / "my" / "gpipe.py"
    row = next(ln for ln in dtlab("exercise", "list", env=state).stdout.splitlines()
               if "gpipe" in ln)
    assert "written, not checked yet" in row and "docs/pipeline.md" in row
    assert dtlab("check", "gpipe", "--impl", mine, env=state).returncode == 1
    row = next(ln for ln in dtlab("exercise", "list", env=state).stdout.splitlines()
               if "gpipe" in ln)
    assert "fails (checked" in row
    mine.write_text((checker.HERE / "solutions" / "gpipe.py").read_text())
    row = next(ln for ln in dtlab("exercise", "list", env=state).stdout.splitlines()
               if "gpipe" in ln)
    assert "changed since its last check" in row
    assert dtlab("check", "gpipe", "--impl", mine, env=state).returncode == 0
    row = next(ln for ln in dtlab("exercise", "list", env=state).stdout.splitlines()
               if "gpipe" in ln)
    assert "passes (checked" in row and str(mine) in row
    data = json.loads((tmp_path / "state" / "exercises.json").read_text())
    assert data["gpipe"]["passed"] is True and data["gpipe"]["file"] == str(mine.resolve())
    mine.unlink()
    row = next(ln for ln in dtlab("exercise", "list", env=state).stdout.splitlines()
               if "gpipe" in ln)
    assert "file gone" in row


def test_a_damaged_state_file_reads_as_nothing_started(tmp_path, state):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "exercises.json").write_text("{not json")
    assert all(r["status"] == "not started" for r in progress.rows(list(checker.EXERCISES)))


def test_every_incident_is_in_the_course_and_the_lists(state):
    """The incidents' catalogue and the course agree; `dtlab exercise list` shows every
    exercise and every incident, and `dtlab incident list` the incidents with their pages."""
    from dtlab import registry
    from conftest import ROOT
    from dtlab.incidents.catalogue import INCIDENTS
    assert set(INCIDENTS) == set(progress.BY_INCIDENT) and len(INCIDENTS) >= 6
    for lesson in progress.INCIDENTS:
        assert lesson.lab in registry.LABS and (ROOT / "docs" / lesson.page).is_file(), lesson
    out = dtlab("exercise", "list", env=state).stdout
    assert len(checker.EXERCISES) >= 18
    for name in [*checker.EXERCISES, *INCIDENTS]:
        assert any(name in ln and "not started" in ln for ln in out.splitlines()), name
    out = dtlab("incident", "list", env=state).stdout
    assert all(f"docs/{x.page}" in out for x in progress.INCIDENTS)


def test_incident_bad_input_is_one_line(state):
    p = dtlab("incident", "start", "no-such-thing", env=state)
    assert p.returncode == 2 and "unknown incident 'no-such-thing'; choose from" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = dtlab("incident", "check", "slow-link", "--deadline", "0", env=state)
    assert p.returncode == 2 and "--deadline" in p.stderr


def test_the_course_page_lists_every_step_in_order():
    """docs/exercises.md's course table: every exercise, then every incident, in the order
    `dtlab exercise list` prints them, with the same minutes."""
    from conftest import ROOT
    text = (ROOT / "docs" / "exercises.md").read_text()
    table = text.split("## The course", 1)[1].split("\n\n| exercise |", 1)[0]
    rows = [ln.split("|") for ln in table.splitlines() if ln.startswith("| ") and "`" in ln]
    got = [(r[2].strip().split("`")[1], int(r[4])) for r in rows]
    assert got == [(x.exercise, x.minutes) for x in progress.COURSE + progress.INCIDENTS]
