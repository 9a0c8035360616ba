import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory):
    """Every tiny pipeline family built once and saved to disk: {family: path}."""
    from stepdistill.testing.tiny_pipelines import TINY_FAMILIES

    root = tmp_path_factory.mktemp("tiny")
    paths = {name: make(root / name) for name, make in TINY_FAMILIES.items()}
    paths["pixel_cls"] = TINY_FAMILIES["pixel"](root / "pixel_cls", num_class_embeds=5)
    paths["sd_v"] = TINY_FAMILIES["sd"](root / "sd_v", prediction_type="v_prediction")
    return paths


@pytest.fixture(scope="session")
def eval_script():
    """Loads a script under eval/ as a module: ``eval_script("coco30k")``."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "eval"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture
def record_gan_logits():
    """``with record_gan_logits() as calls:`` records every call of DMD2's classifier head as
    (clean samples, their conditioning), in call order."""
    from contextlib import contextmanager

    @contextmanager
    def record():
        from stepdistill.distillers.dmd import DMD2

        calls, logits = [], DMD2._logits

        def spy(self, x, cond, batch):
            calls.append((x.detach().clone(), cond))
            return logits(self, x, cond, batch)

        DMD2._logits = spy
        try:
            yield calls
        finally:
            DMD2._logits = logits

    return record
