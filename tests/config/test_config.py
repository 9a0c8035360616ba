import subprocess
import sys
from pathlib import Path

import pytest

from stepdistill.config import ConfigError, load_config
from stepdistill.training import validate_inputs

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p not in ACCELERATE)


def test_there_are_shipped_configs():
    assert len(SHIPPED) >= 8


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT / "configs")) for p in SHIPPED])
def test_every_shipped_config_loads_and_validates(path, tiny_pipelines, monkeypatch):
    monkeypatch.chdir(ROOT)
    overrides = []
    if path.parent.name.startswith("tiny-"):
        overrides.append(f"teacher.path={tiny_pipelines[path.parent.name[5:]]}")
    cfg = load_config(path, overrides)
    method = validate_inputs(cfg)
    opts = method.Options  # the method's own options parse
    assert method.name == cfg.method or ":" in cfg.method, (cfg.method, method)
    assert opts is not None
    name = path.stem  # <method>_<N>step
    if name != "default":
        assert name.endswith(f"_{cfg.student.num_steps}step"), f"{path.name}: student.num_steps={cfg.student.num_steps}"


@pytest.mark.parametrize("path", ACCELERATE, ids=[p.name for p in ACCELERATE])
def test_shipped_accelerate_configs_load(path):
    """configs/accelerate/*.yaml are accelerate launch configs that accelerate itself reads, each giving
    every value accelerate would otherwise warn about."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.mixed_precision == "no"
    # num_processes is the total over the machines: a whole number of processes on each machine.
    assert cfg.num_machines >= 1 and cfg.num_processes >= cfg.num_machines
    assert cfg.num_processes % cfg.num_machines == 0, (cfg.num_processes, cfg.num_machines)
    if cfg.num_machines > 1:  # the several-machine config names where rank 0 listens
        assert cfg.main_process_ip and cfg.main_process_port and cfg.rdzv_backend == "static"
    assert cfg.dynamo_config == {} or cfg.dynamo_config.get("dynamo_backend", "NO") in ("NO", "no")


def _cfg(tmp_path, text, overrides=()):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return load_config(p, overrides)


BASE = "method: progressive\nteacher:\n  oracle: {components: 4}\n"


@pytest.mark.parametrize("text,overrides,match", [
    (BASE, ["method=no_such_method"], "unknown method 'no_such_method'"),
    (BASE, ["train.bach_size=4"], "unknown config key 'train.bach_size' \\(did you mean 'train.batch_size'\\?\\)"),
    (BASE, ["student.timesteps=[249, 499, 999]"], "student.timesteps: must be strictly descending"),
    (BASE, ["train.max_steps=0"], "train.max_steps: must be >= 1"),
    (BASE, ["train.batch_size=abc"], "train.batch_size: expected an integer"),
    (BASE, ["train.mixed_precision=fp8"], "train.mixed_precision: 'fp8' is not one of"),
    (BASE, ["method_args.start_steps=6"], "start_steps must be a power of two"),
    (BASE, ["method_args.x_sourse=data"], "unknown config key 'method_args.x_sourse'"),
    ("method: progressive\nteacher: {}\n", [], "give exactly one of teacher.path"),
    ("teacher:\n  oracle: {}\n", [], "missing config key 'method'"),
    (BASE, ["teacher.oracle=null", "teacher.path=/no/such/teacher"], "teacher path '/no/such/teacher' does not exist"),
    (BASE, ["data.prompts=/no/prompts.txt"], "prompt file '/no/prompts.txt' does not exist"),
    (BASE, ["optim.fake.lr=1e-4"], "optim.fake: method progressive has no trainable 'fake'"),
    (BASE, ["method=notamodule.Thing"], "cannot import plug-in 'notamodule.Thing'"),
])
def test_bad_config_names_the_key(tmp_path, text, overrides, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        validate_inputs(_cfg(tmp_path, text, overrides))


def test_batch_must_divide_by_processes(tmp_path):
    cfg = _cfg(tmp_path, BASE, ["train.batch_size=5"])
    validate_inputs(cfg, num_processes=1)
    with pytest.raises(ConfigError, match="train.batch_size: 5 does not divide by num_processes \\(2\\)"):
        validate_inputs(cfg, num_processes=2)


def test_cli_fails_before_training_with_one_line(tmp_path):
    out = tmp_path / "never"
    r = subprocess.run([sys.executable, str(ROOT / "train/distill.py"), "--config", str(ROOT / "configs/oracle/boot_1step.yaml"),
                        f"train.output_dir={out}", "student.timesteps=[1, 5]"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert lines == ["error: student.timesteps: must be strictly descending (first = t_init), got [1.0, 5.0]"]
    assert not out.exists()


def test_dry_run_prints_resolved_config_with_overrides():
    r = subprocess.run([sys.executable, str(ROOT / "train/distill.py"), "--config", str(ROOT / "configs/oracle/boot_1step.yaml"),
                        "--dry-run", "train.max_steps=7", "method_args.grid_steps=4"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    import yaml

    cfg = yaml.safe_load(r.stdout)
    assert cfg["train"]["max_steps"] == 7 and cfg["method_args"]["grid_steps"] == 4 and cfg["method"] == "boot"
