"""stepdistill.storage: a folder swapped in whole, a cache keyed by its settings and made again when they
change or it is damaged, and temporaries of dead writers cleaned without touching anyone else's."""

import logging
import os
import subprocess
import sys

import pytest

from stepdistill.storage import (
    KEY_FILE,
    key_problem,
    load_or_make,
    recover_swap,
    remove_dead_temporaries,
    swap_in,
    temporary_name,
)


def _folder(path, text):
    path.mkdir(parents=True)
    (path / "f.txt").write_text(text)
    return path


def test_swap_in_replaces_a_folder_whole_and_a_half_swap_is_undone(tmp_path):
    final = _folder(tmp_path / "pipeline", "old")
    swap_in(_folder(tmp_path / "new", "new"), final)
    assert (final / "f.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]
    # killed between the two renames: the old folder is back, complete
    os.replace(final, tmp_path / "pipeline.old")
    recover_swap(final)
    assert (final / "f.txt").read_text() == "new" and not (tmp_path / "pipeline.old").exists()
    # killed after both renames, before the old copy was deleted: the new one stays
    _folder(tmp_path / "pipeline.old", "older")
    recover_swap(final)
    assert (final / "f.txt").read_text() == "new" and not (tmp_path / "pipeline.old").exists()


def test_key_problem_names_every_difference():
    assert key_problem({"a": 1, "b": 2}, {"a": 1, "b": 2}) is None
    assert key_problem({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == "b: 2 -> 3; c: None -> 4"
    assert key_problem(None, {"a": 1}) == "it records no settings"


@pytest.mark.parametrize("damage", ["other settings", "no key", "garbage content", "key is not json"])
def test_load_or_make_keeps_a_good_cache_and_remakes_a_stale_or_damaged_one(tmp_path, caplog, damage):
    made = []

    def make():
        made.append(1)
        return f"value {len(made)}"

    def save(value, folder):
        (folder / "value.txt").write_text(value)

    def load(folder):
        text = (folder / "value.txt").read_text()
        if not text.startswith("value"):
            raise ValueError("not a value")
        return text

    folder = tmp_path / "cache"
    args = dict(make=make, save=save, load=load, what="the test cache")
    assert load_or_make(folder, {"k": 1}, **args) == "value 1"
    assert load_or_make(folder, {"k": 1}, **args) == "value 1" and len(made) == 1  # kept
    if damage == "other settings":
        key = {"k": 2}
    else:
        key = {"k": 1}
        if damage == "no key":
            (folder / KEY_FILE).unlink()
        elif damage == "garbage content":
            (folder / "value.txt").write_text("garbage")
        else:
            (folder / KEY_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="stepdistill"):
        assert load_or_make(folder, key, **args) == "value 2"
    assert "the test cache" in caplog.text and "making it again" in caplog.text
    assert load_or_make(folder, key, **args) == "value 2" and len(made) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no temporaries left


def test_only_the_temporaries_of_dead_processes_of_this_machine_are_removed(tmp_path):
    target = tmp_path / "pipeline"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    mine = temporary_name(target)  # this (live) process's
    theirs = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{dead_pid}-"))
    elsewhere = tmp_path / f".pipeline.tmp-00000000-{dead_pid}-abcdef12"  # another machine's (another host hash)
    user = tmp_path / "pipeline"  # the user's own folder
    for p in (mine, theirs, elsewhere, user):
        p.mkdir()
    assert remove_dead_temporaries(target) == [theirs]
    assert mine.is_dir() and elsewhere.is_dir() and user.is_dir() and not theirs.exists()


def test_a_stop_is_not_taken_for_a_damaged_cache(tmp_path):
    """A SIGTERM raised inside a cache's load (Interrupted, a BaseException) stops the command; it is
    not caught as damage and the cache is not made again."""
    from stepdistill.errors import Interrupted

    def load(folder):
        raise Interrupted(None, signal="SIGTERM")

    folder = tmp_path / "cache"
    load_or_make(folder, {"k": 1}, make=lambda: "v", save=lambda v, f: (f / "v.txt").write_text(v), load=lambda f: "v",
                 what="the test cache")
    with pytest.raises(Interrupted):
        load_or_make(folder, {"k": 1}, make=lambda: pytest.fail("made again"), save=None, load=load, what="the test cache")


def test_several_processes_may_claim_one_folder_at_once(tmp_path):
    """A folder where another process of the same command is writing its marker (its temporary is
    there) is not taken for the user's."""
    from stepdistill.storage import FOLDER_MARKER, claim_folder

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / f".{FOLDER_MARKER}.tmp-0000-1-abcd").write_text("{}")
    assert claim_folder(folder, "coco30k", {"a": 1}) == folder
    assert claim_folder(folder, "coco30k", {"a": 1}) == folder  # the second process finds the marker


@pytest.mark.parametrize("content,claimed", [
    ("method: dmd2\nteacher: {path: x}\ntrain: {max_steps: 3}\n", True),  # a run's config (written before markers)
    ("my: notes\n", False),  # the user's own config.yaml
    ("[not, a, mapping]", False),
])
def test_a_run_folder_from_before_markers_is_a_run_config_not_any_config_yaml(tmp_path, content, claimed):
    from stepdistill.errors import InputError
    from stepdistill.storage import claim_folder
    from stepdistill.training.run_folder import is_run_folder

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text(content)
    if claimed:
        assert claim_folder(folder, "distill", legacy=is_run_folder) == folder
    else:
        with pytest.raises(InputError, match="holds files stepdistill distill did not write \\(config.yaml\\)"):
            claim_folder(folder, "distill", legacy=is_run_folder)
        assert (folder / "config.yaml").read_text() == content
