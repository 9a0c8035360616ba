"""Every model family x every method, in one table (MATRIX): each cell trains a shipped tiny config for
two iterations on the family's tiny pipeline (in process, as ``stepdistill distill`` runs it), and

- ``exports``: exports with train.export, and the exported stock pipeline samples what the toolkit's
  ``Student.sample`` samples for the same seed (rtol = atol = 1e-5);
- ``trains``: train.export is refused in one line before training (REASONS names why), and without it
  the run trains;
- ``refused``: the config is refused in one line with the reason, before anything is written.

docs/METHODS.md carries the same table; test_the_doc_matrix_is_the_tested_one reads it back. One cell
per family and one per method (FAST) and the refused cells run by default, the rest are slow (2-11 s
each on 2 cores)."""

import json
import re
from pathlib import Path

import pytest
import torch
from helpers.stock import VIDEO_FAMILIES, as_latents, family_teacher, stock_call, toolkit_sample
from helpers.video import VIDEO

from stepdistill.config import ConfigError, load_config
from stepdistill.export.schedulers import flow_match_grid
from stepdistill.models.student import networks

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ["sd", "sdxl", "dit", "pixart", "sd3", "sd35", "flux", "qwenimage", "sana", "wan", "wan22", "hunyuanvideo"]
METHODS = ["dmd2", "sid", "lcm", "phased_dmd", "progressive", "vsd", "dmd", "guided", "boot", "disback", "tsm"]
CONFIG = {"dmd2": "dmd2_4step", "sid": "sid_1step", "lcm": "lcm_4step", "phased_dmd": "phased_dmd_2step",
          "progressive": "progressive_2step", "vsd": "vsd_1step", "dmd": "dmd_1step", "guided": "guided_2step",
          "boot": "boot_1step", "disback": "disback_1step", "tsm": "tsm_4step"}
# where a family has no config of its own for a method: the configs of the nearest family (same process
# kind; dit's for pixart, whose transformer has no diffusers LoRA support either)
FALLBACK = {"sdxl": "sd", "pixart": "dit", "sd35": "sd3", "sana": "sd3", "flux": "sd3", "qwenimage": "sd3",
            "wan": "sd3", "wan22": "wan", "hunyuanvideo": "sd3"}
FAMILY_ARGS = {"pixart": ["data.prompts=configs/prompts/example.txt"], "flux": ["teacher.sample_size=8"],
               "qwenimage": ["teacher.sample_size=8"], "wan": [f"teacher.video_size={list(VIDEO)}"],
               "wan22": [f"teacher.video_size={list(VIDEO)}"], "hunyuanvideo": [f"teacher.video_size={list(VIDEO)}"]}
# the reasons a cell is refused (R) or trains without an export (T): the start of the one-line error
REASONS = {
    "w-student": "train.export: the student is a Guided",  # ...: a guidance-conditioned network that no stock
    "wan-grid": "train.export: WanPipeline passes no sigmas to its scheduler",  # pipeline feeds the scale
    "no-w-input": "method guided: ",  # <class> has no guidance-scale input; supported: ... (NO_W_INPUT)
    "embedded-cfg": "method_args.w_max=8.0: classifier-free guidance on ",  # <class>, whose ... (EMBEDDED_CFG)
}
NO_W_INPUT = r"^method guided: (QwenImageTransformer2DModel|WanTransformer3DModel) has no guidance-scale input; supported: "
EMBEDDED_CFG = (r"^method_args.w_max=8.0: classifier-free guidance on (FluxTransformer2DModel|HunyuanVideoTransformer3DModel), "
                r"whose guidance scale is a network input")
E, T, R = "exports", "trains", "refused"
_W = (T, "w-student")
MATRIX = {  # (family, method): (status, reason or None, extra overrides)
    **{(f, m): (E, None, []) for f in FAMILIES for m in METHODS},
    # Phased DMD: one shared network (method_args.experts=false) is the form a one-network pipeline runs;
    # WanPipeline's transformer_2 takes a 2-step student's second expert
    **{(f, "phased_dmd"): (E, None, ["method_args.experts=false"]) for f in FAMILIES if not f.startswith("wan")},
    # a guidance-scale input (Meng et al.'s w, LCM's w embedding): only SD's UNet has one a pipeline feeds
    **{(f, m): (*_W, []) for f in ("dit", "pixart", "sd3", "sd35", "sana") for m in ("guided", "lcm")},
    ("flux", "guided"): (R, "embedded-cfg", []), ("hunyuanvideo", "guided"): (R, "embedded-cfg", []),
    ("qwenimage", "guided"): (R, "no-w-input", []), ("wan", "guided"): (R, "no-w-input", []),
    ("wan22", "guided"): (R, "no-w-input", []),
    # FLUX.1-dev's guidance is a network input: the methods' CFG options are off (the tiny-flux configs)
    **{("flux", m): (E, None, ["method_args.guidance_scale=1.0", "teacher.guidance=3.5"])
       for m in ("boot", "dmd", "disback")},
    # so is HunyuanVideo's (at HunyuanVideoPipeline's 6.0, the tiny-hunyuanvideo configs)
    **{("hunyuanvideo", m): (E, None, ["method_args.guidance_scale=1.0", "teacher.guidance=6.0"])
       for m in ("boot", "dmd", "disback")},
    ("qwenimage", "lcm"): (E, None, ["method_args.w_embedding=false"]),
    # WanPipeline runs only its scheduler's own grids
    ("wan", "lcm"): (T, "wan-grid", []), ("wan22", "lcm"): (T, "wan-grid", []),
    ("wan", "tsm"): (T, "wan-grid", []), ("wan22", "tsm"): (T, "wan-grid", []),
    ("wan22", "dmd2"): (E, None, ["student.timesteps=" + str(flow_match_grid(4, 5.0, 0.625))]),
}
# in the default run: one cell per family and one per method
FAST = {("sd", "lcm"), ("sdxl", "guided"), ("dit", "boot"), ("pixart", "tsm"), ("sd3", "disback"), ("sd35", "dmd"),
        ("flux", "dmd2"), ("qwenimage", "progressive"), ("sana", "sid"), ("wan", "vsd"), ("wan22", "phased_dmd"),
        ("hunyuanvideo", "dmd2")}
# iterations per run: 2, or the config's own 4 where a method needs them (guided's two stages, DisBack's
# degradation and backtracking, DMD2's and Phased DMD's student updates after their fake scores')
STEPS = {"guided": 4, "disback": 4, "dmd2": 4, "phased_dmd": 4}


def config_path(family: str, method: str) -> Path:
    fam = family
    while not (ROOT / "configs" / f"tiny-{fam}" / f"{CONFIG[method]}.yaml").is_file():
        fam = FALLBACK[fam]
    return ROOT / "configs" / f"tiny-{fam}" / f"{CONFIG[method]}.yaml"


def _config(tiny_pipelines, family, method, run, *extra):
    return load_config(config_path(family, method),
                       [f"teacher.path={tiny_pipelines[family]}", f"train.output_dir={run}", "train.report_to=none",
                        "train.progress=false", f"train.max_steps={STEPS.get(method, 2)}", "train.checkpoint_every=2",
                        "train.validate_every=2", *FAMILY_ARGS.get(family, []), *MATRIX[family, method][2], *extra])


def exported_and_toolkit_samples(folder: Path, student_dir: Path, teacher, family: str):
    """(pipeline, its output, the toolkit's ``Student.sample`` in the same form) for the same initial noise
    and re-noising stream (tests/helpers/stock.py; test_export_stock.py samples in a process of its own)."""
    from diffusers import DiffusionPipeline

    from stepdistill.models.student import Student

    student = Student.load(student_dir)  # (building a network draws from the global generator: before the seed)
    pipe = DiffusionPipeline.from_pretrained(folder)  # plain diffusers from here
    assert type(pipe).__name__ == type(teacher.pipeline).__name__
    call = stock_call(folder, teacher, family)
    torch.manual_seed(123)
    out = pipe(**call, generator=torch.Generator().manual_seed(7))
    got = torch.as_tensor(out.frames if family in VIDEO_FAMILIES else out.images).float()
    return pipe, as_latents(got, teacher, family, call), toolkit_sample(student, teacher, family), student


def _cells():
    for family in FAMILIES:
        for method in METHODS:
            fast = (family, method) in FAST or MATRIX[family, method][0] == R  # a refusal takes under a second
            marks = () if fast else (pytest.mark.slow,)
            yield pytest.param(family, method, marks=marks, id=f"{family}-{method}")


@pytest.mark.parametrize("family,method", _cells())
def test_cell(tmp_path, tiny_pipelines, monkeypatch, family, method):
    from stepdistill.distill import train

    monkeypatch.chdir(ROOT)  # the configs' prompt file
    status, reason, _ = MATRIX[family, method]
    run = tmp_path / "run"
    if status != E:  # refused in one line before anything is trained or written
        with pytest.raises(ConfigError) as err:
            train(_config(tiny_pipelines, family, method, run, f"train.export={str(status == T).lower()}"))
        assert str(err.value).startswith(REASONS[reason]) and "\n" not in str(err.value), str(err.value)
        assert reason != "no-w-input" or re.match(NO_W_INPUT, str(err.value)), str(err.value)
        assert reason != "embedded-cfg" or re.match(EMBEDDED_CFG, str(err.value)), str(err.value)
        assert not (run / "checkpoints").exists()
        if status == R:
            return
    train(_config(tiny_pipelines, family, method, run, f"train.export={str(status == E).lower()}"))
    hist = json.loads((run / "history.json").read_text())
    steps = STEPS.get(method, 2)
    assert len(hist) == steps and all(torch.isfinite(torch.tensor(v)) for h in hist for k, v in h.items() if k.endswith("loss"))
    assert (run / "checkpoints" / f"checkpoint-{steps}" / "manifest.json").is_file()
    assert (run / "samples" / "step_0000002.png").is_file()
    assert (run / "samples" / "step_0000002.gif").is_file() == (family in VIDEO_FAMILIES)  # a clip per validation
    teacher = family_teacher(tiny_pipelines, family)
    if status == T:
        assert not (run / "pipeline").exists()
        return
    pipe, got, ref, student = exported_and_toolkit_samples(run / "pipeline", run / "student", teacher, family)
    # BOOT's folded time embedding is computed once for a batch of one: last-bit differences, which its x0
    # reading at t_max multiplies
    tol = 1e-4 if method == "boot" else 1e-5
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    assert student.spec.method == method and len(student.spec.timesteps) == int(CONFIG[method].split("_")[-1][0])
    if family in ("flux", "hunyuanvideo"):  # a guidance input: distilled, sampled and exported with the teacher's
        assert student.spec.guidance_scale == {"flux": 3.5, "hunyuanvideo": 6.0}[family]
        assert json.loads((run / "pipeline" / "stepdistill_sampling.json").read_text())["call_kwargs"]["guidance_scale"] \
            == student.spec.guidance_scale
    if family in ("wan", "wan22"):
        assert (pipe.transformer_2 is not None) == (method == "phased_dmd")  # one expert per step
    if family in VIDEO_FAMILIES:
        call = json.loads((run / "pipeline" / "stepdistill_sampling.json").read_text())["call_kwargs"]
        assert [call[k] for k in ("num_frames", "height", "width")] == list(VIDEO)  # the run's video size
        assert "export_to_video(frames" in (run / "pipeline" / "README.md").read_text()
    # training moved the student away from the teacher: some weight differs from the same weight of every
    # teacher network (each expert of a two-expert teacher or student)
    teachers = [n.state_dict() for n in networks(teacher.denoiser.model)]
    moved = [k for net in networks(student.model) for k, v in net.state_dict().items()
             if all(k in t and t[k].shape == v.shape and not torch.equal(t[k], v) for t in teachers)]
    assert moved


def _doc_matrix() -> dict:
    """docs/METHODS.md's family x method table: {(family, method): (status, reason)}."""
    text = (ROOT / "docs" / "METHODS.md").read_text()
    section = text.split("## Families x methods", 1)[1]
    rows = [r for r in section.splitlines() if r.startswith("|")]
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    assert head[0] == "method"
    out = {}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        method = cells[0].strip("`")
        for family, cell in zip(head[1:], cells[1:]):
            m = re.fullmatch(r"(yes|trains|no)(?: \((\S+)\))?", cell)
            assert m, (method, family, cell)
            out[family.strip("`"), method] = ({"yes": E, "trains": T, "no": R}[m[1]], m[2])
    legend = section.split("\n\n")
    for key, line in REASONS.items():  # each reason's note quotes the start of its error line
        assert any(p.startswith(f"`{key}`") and line in " ".join(p.split()) for p in legend), key
    return out


def test_the_doc_matrix_is_the_tested_one():
    assert _doc_matrix() == {k: v[:2] for k, v in MATRIX.items()}


def test_every_cell_has_a_config():
    """Each cell's config exists, and every status and reason is one the table defines."""
    assert set(MATRIX) == {(f, m) for f in FAMILIES for m in METHODS}
    for (family, method), (status, reason, _) in MATRIX.items():
        assert config_path(family, method).is_file()
        assert status in (E, T, R) and (reason is None) == (status == E) and (reason is None or reason in REASONS)
    assert {f for f, _ in FAST} == set(FAMILIES) and {m for _, m in FAST} == set(METHODS)
