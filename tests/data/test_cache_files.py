"""The data cache's files are checked when read back: each shard's size and sha256 are in the manifest
and checked when a run opens the cache, so a shard that was truncated, deleted or altered after
caching is one error naming it (re-running the cache command encodes it again); bad --shard-rows are
refused before any work."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepdistill.config import load_config
from stepdistill.data.cache import DataCache, build_cache
from stepdistill.errors import DataError, InputError

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [f"a photo of a cat number {i}" for i in range(5)]


def _cfg(tiny_pipelines, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    return load_config(ROOT / "configs" / "tiny-sd" / "dmd2_4step.yaml",
                       [f"teacher.path={tiny_pipelines['sd']}", f"data.prompts={prompts}",
                        f"train.output_dir={tmp_path / 'run'}"])


@pytest.fixture
def cache(tiny_pipelines, tmp_path):
    cfg = _cfg(tiny_pipelines, tmp_path)
    return cfg, build_cache(cfg, tmp_path / "cache", shard_rows=2)


def _damage(folder: Path, how: str) -> str:
    shard = folder / "prompts" / "00001.safetensors"
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "deleted":
        shard.unlink()
    elif how == "zeroed":  # the same size, other content: the latents or states of a damaged disk
        data = bytearray(shard.read_bytes())
        data[-64:] = bytes(64)
        shard.write_bytes(bytes(data))
    return "prompts/00001.safetensors"


def test_the_manifest_records_every_shard(cache):
    _, folder = cache
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert sorted(files) == ["prompts/00000.safetensors", "prompts/00001.safetensors", "prompts/00002.safetensors",
                             "uncond.safetensors"]
    rows = DataCache(folder).prompt_rows()[0](torch.tensor([0, 3, 4]))  # every shard opens and checks
    assert rows.batch_size() == 3


@pytest.mark.parametrize("how,message", [("truncated", r"has \d+ bytes, the manifest says \d+"),
                                         ("deleted", "is missing"), ("zeroed", "does not match its checksum")])
def test_a_damaged_shard_is_one_error_naming_it_and_the_cache_command_rewrites_it(cache, how, message):
    cfg, folder = cache
    rel = _damage(folder, how)
    with pytest.raises(DataError, match=rf"data.cache: '.*cache': {rel} {message}; run stepdistill cache again") as err:
        DataCache(folder)  # checked before the first read, so no step ever trains on it
    assert "\n" not in str(err.value)
    build_cache(cfg, folder, shard_rows=2)  # re-running the command encodes the damaged shard again
    assert DataCache(folder).prompt_rows()[0](torch.tensor([2, 3])).batch_size() == 2


@pytest.mark.parametrize("edit", [lambda m: m.pop("files"), lambda m: m.update(shard_rows=0),
                                  lambda m: m.update(files={"../x": {"size": 1, "sha256": "0"}}),
                                  lambda m: m.update(key=None)])
def test_a_malformed_manifest_is_refused_in_one_line(cache, edit):
    _, folder = cache
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"data.cache: '.*cache.*' (is malformed|records no checksums)"):
        DataCache(folder)


@pytest.mark.parametrize("rows", [0, -3, True])
def test_bad_shard_rows_are_refused_before_any_work(tiny_pipelines, tmp_path, rows):
    with pytest.raises(InputError, match=rf"--shard-rows must be an integer >= 1, got {rows!r}"):
        build_cache(_cfg(tiny_pipelines, tmp_path), tmp_path / "cache", shard_rows=rows)
    assert not (tmp_path / "cache").exists()


def test_the_cache_command_refuses_bad_shard_rows_in_one_line(tiny_pipelines, tmp_path):
    r = subprocess.run([sys.executable, "-m", "stepdistill", "cache", "--config",
                        str(ROOT / "configs" / "tiny-sd" / "dmd2_4step.yaml"), "--out", str(tmp_path / "c"),
                        "--shard-rows", "0", f"teacher.path={tiny_pipelines['sd']}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: --shard-rows must be an integer >= 1, got 0"]
    assert not (tmp_path / "c").exists()
