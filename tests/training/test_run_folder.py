"""Nothing a user has is lost: the checkpoint limit keeps the good checkpoints, a folder that holds
another run is refused, caches made for other settings are rebuilt, temporary names are the
process's own, existing outputs are not replaced, and one run at a time holds a folder."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stepdistill.cli import main
from stepdistill.config import ConfigError, load_config
from stepdistill.storage import load_state
from stepdistill.training import Trainer, list_checkpoints
from stepdistill.training.run_folder import RunLock

ORACLE = ["teacher.oracle.components=4", "teacher.oracle.network_steps=50", "train.batch_size=8", "train.report_to=none",
          "train.progress=false", "train.num_validation=8", "train.validate_every=1000"]


def _cfg(out, *extra, method="progressive"):
    return load_config(None, [f"method={method}", *ORACLE, f"train.output_dir={out}", *extra])


def _snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _corrupt(ckpt: Path):
    f = ckpt / "student/diffusion_pytorch_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))


def test_the_limit_never_counts_a_broken_checkpoint_nor_deletes_the_newest_good_one(tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(out, "train.max_steps=4", "train.checkpoint_every=2", "train.checkpoints_total_limit=null")).fit()
    _corrupt(out / "checkpoints" / "checkpoint-4")
    # resume skips the broken checkpoint-4, trains from 2, saves 3 with a limit of 1
    Trainer(_cfg(out, "train.max_steps=3", "train.checkpoint_every=1", "train.checkpoints_total_limit=1")).fit()
    names = [c.name for c in list_checkpoints(out)]
    assert "checkpoint-3" in names and "checkpoint-2" not in names  # the good one just written is kept
    trainer = Trainer(_cfg(out, "train.max_steps=5", "train.checkpoint_every=1", "train.checkpoints_total_limit=1"))
    assert trainer.resume() == 3  # not 0: a good checkpoint survived
    trainer.close()


def test_a_folder_holding_another_run_is_refused_even_without_checkpoints(tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(out, "train.max_steps=2", "train.checkpoint_every=2")).fit()
    for ckpt in list_checkpoints(out):
        import shutil

        shutil.rmtree(ckpt)
    before = _snapshot(out)
    with pytest.raises(ConfigError, match=r"holds another run \(.*method_args.start_steps: 32 -> 4.*train.seed: 0 -> 5"):
        Trainer(_cfg(out, "train.max_steps=2", "train.seed=5", "method_args.start_steps=4"))
    assert _snapshot(out) == before  # student/, config.yaml, run.json: untouched
    Trainer(_cfg(out, "train.max_steps=3", "train.checkpoint_every=3")).fit()  # the same run, a longer budget: fine


def test_a_cached_oracle_network_made_for_another_layout_is_fitted_again(tmp_path, caplog):
    out = tmp_path / "run"
    trainer = Trainer(_cfg(out, "train.max_steps=1", "teacher.oracle.components=4"))
    trainer.close()
    (out / "run.json").unlink(missing_ok=True)  # as a failed run leaves it: the cache, no record
    with caplog.at_level("WARNING", logger="stepdistill"):
        trainer = Trainer(_cfg(out, "train.max_steps=1", "teacher.oracle.components=6"))
    trainer.close()
    assert "oracle's fitted network at" in caplog.text and "(components: 4 -> 6): making it again" in caplog.text
    key = json.loads((out / "oracle_network" / "stepdistill_key.json").read_text())
    assert key["components"] == 6


def test_dmd_regression_pairs_made_under_other_settings_are_generated_again(tmp_path, caplog):
    out = tmp_path / "run"
    Trainer(_cfg(out, "train.max_steps=1", "method_args.regression_pairs=16", method="dmd")).close()
    assert len(load_state(out / "dmd_regression_pairs", "pairs")["noise"]) == 16
    with caplog.at_level("WARNING", logger="stepdistill"):
        Trainer(_cfg(out, "train.max_steps=1", "method_args.regression_pairs=24", method="dmd")).close()
    assert "regression pairs at" in caplog.text and "(pairs: 16 -> 24): making it again" in caplog.text
    assert len(load_state(out / "dmd_regression_pairs", "pairs")["noise"]) == 24


@pytest.mark.parametrize("damage", [
    ("oracle_network/config.json", b"{not json"),
    ("oracle_network/diffusion_pytorch_model.safetensors", b"garbage"),
    ("oracle_network/stepdistill_key.json", b"[1, 2"),
    ("dmd_regression_pairs/pairs.safetensors", b"\x00" * 64),
    ("dmd_regression_pairs/pairs.json", b"{}"),
])
def test_a_damaged_cache_in_the_run_folder_is_made_again(tmp_path, caplog, damage):
    """The run folder's caches are read back checked: damaged, they are made again with a warning (and
    the run goes on), never a crash."""
    out = tmp_path / "run"
    args = ("train.max_steps=1", "method_args.regression_pairs=16")
    Trainer(_cfg(out, *args, method="dmd")).close()
    name, garbage = damage
    (out / name).write_bytes(garbage)
    with caplog.at_level("WARNING", logger="stepdistill"):
        trainer = Trainer(_cfg(out, *args, method="dmd"))
    trainer.fit()
    assert "making it again" in caplog.text and name.split("/")[0] in caplog.text
    assert len(load_state(out / "dmd_regression_pairs", "pairs")["noise"]) == 16
    assert (out / "student").is_dir()


def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    first = Trainer(_cfg(out, "train.max_steps=1"))
    with pytest.raises(ConfigError, match=rf"'{out}' is in use by another run \(pid {os.getpid()} on .*\); wait for it"):
        Trainer(_cfg(out, "train.max_steps=1"))
    first.fit()  # fit releases the folder at its end
    assert not (out / ".lock").exists()
    Trainer(_cfg(out, "train.max_steps=2", "train.checkpoint_every=2")).fit()


def test_a_lock_left_by_a_killed_run_is_stale_and_taken_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from stepdistill.training.run_folder import RunLock
        RunLock({str(folder)!r}).acquire()
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid} "):
        RunLock(folder).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (folder / ".lock").is_file()  # the dead holder's note remains...
    lock = RunLock(folder)
    lock.acquire()  # ...but its lock went with it
    assert f"pid {os.getpid()} " in (folder / ".lock").read_text()
    lock.release()


def test_export_never_touches_a_tmp_folder_it_did_not_make(tmp_path, tiny_pipelines):
    from stepdistill.export import export

    run = tmp_path / "run"
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny-sd" / "progressive_2step.yaml", [
        f"teacher.path={tiny_pipelines['sd']}", f"train.output_dir={run}", "train.report_to=none", "train.progress=false",
        "train.max_steps=1"])
    Trainer(cfg).fit()
    mine = tmp_path / "pipe.tmp"  # a user's folder that happens to have the old temporary name
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    export(run, tmp_path / "pipe")
    assert (mine / "precious.txt").read_text() == "keep" and (tmp_path / "pipe" / "model_index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # its own temporary folder is gone


def test_fid_refuses_to_replace_existing_statistics_without_overwrite(tmp_path):
    stats = tmp_path / "ref.npz"
    stats.write_bytes(b"30,000 images of work")
    (tmp_path / "imgs").mkdir()
    code = main(["fid", "ref", str(tmp_path / "imgs"), str(stats)])
    assert code == 2 and stats.read_bytes() == b"30,000 images of work"
