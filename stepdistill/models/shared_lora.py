"""One frozen base network for the teacher and the LoRA networks trained on it.

A LoRA student and a LoRA fake score on the teacher's architecture differ from the teacher only by
their adapters, so instead of three whole networks (the teacher, and a copy of it under each LoRA)
the run keeps the teacher's network once, with two named peft adapters (``student``,
``fake_score``) added to it by diffusers' ``add_adapter``. Its adapters are *disabled* by default,
so every call of the network itself (the teacher's ``Denoiser``, the teacher's ODE, a two-expert
teacher's expert) computes the teacher. An :class:`AdapterView` is what the student's or the fake
score's ``Denoiser`` holds: called, it enables its own adapter for that one call and restores the
disabled state afterwards.

What the rest of the toolkit sees of a view:

- its parameters are its adapter's only (the adapter's modules are registered under the view), so
  the optimiser, the EMA, ``requires_grad`` toggling between updates and checkpoints see each
  network's own LoRA weights; a loss through the student gives gradients to the student's adapter
  alone (the teacher's weights and the other adapter do not require grad, or are not in the graph);
- ``unwrap(view)`` is the base (the view's ``module``, not registered as a submodule), so questions
  about the network's class (its denoiser adapter, GAN features, guidance input) are answered as
  for a copy;
- the switch writes the two values peft's LoRA layers read (their active adapter, disabled or not),
  not through peft's ``set_adapter`` / ``enable_adapters``, which also reset ``requires_grad`` (the
  loop's choice of which trainable updates must stand) and cost 0.1 s a switch on SD1.5;
- a view computes in its own training mode (a trainable copy is in training mode, the teacher in
  evaluation mode, and some layers differ: the fake score's features differed by 1e-6 otherwise);
- with gradient checkpointing the backward pass recomputes a block's forward, after the call has
  restored the base's default state: :func:`share_base` makes the base's checkpointing function
  recompute each block under the adapter state and mode its forward ran with (``context_fn`` of
  ``torch.utils.checkpoint``).
"""

from __future__ import annotations

import contextlib
import warnings
from functools import partial

import torch
from torch import nn

from ..diffusion.denoiser import unwrap

STUDENT, FAKE_SCORE = "student", "fake_score"  # the adapter names on a shared base


def lora_layers(base: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every peft tuner layer in ``base``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in base.named_modules() if isinstance(m, BaseTunerLayer)]


def _adapter_parameters(layers) -> list[nn.Parameter]:
    return [p for _, layer in layers for kind in layer.adapter_layer_names for p in getattr(layer, kind).parameters()]


# the two per-layer values peft's LoRA forward reads (through its ``active_adapters`` and ``disable_adapters``
# properties); peft's own switches (``set_adapter``, ``enable_adapters``) also reset ``requires_grad`` and the
# training flags of every adapter, which costs about 0.1 s per switch on SD1.5's 128 LoRA layers, so the
# switch writes these two values (checked against the properties when a view is made)
ACTIVE, DISABLED = "_active_adapter", "_disable_adapters"


def _state(layers) -> list[tuple[object, bool]]:
    return [(getattr(layer, ACTIVE), getattr(layer, DISABLED)) for _, layer in layers]


def _apply(layers, state) -> None:
    for (_, layer), (active, disabled) in zip(layers, state):
        layer.__dict__[ACTIVE] = active
        layer.__dict__[DISABLED] = disabled


@contextlib.contextmanager
def adapter_state(layers, state):
    """Inside: ``layers`` compute with ``state`` (per layer: active adapters, disabled or not); outside,
    as before. ``requires_grad`` is left as it is."""
    before = _state(layers)
    try:
        _apply(layers, state)
        yield
    finally:
        _apply(layers, before)


def _check_switch(layers, name: str) -> None:
    """The switch's two values are what peft's properties read (a peft version that keeps them elsewhere
    is refused, naming the option that avoids the switch)."""
    with adapter_state(layers, [([name], False) for _ in layers]):
        ok = all(layer.active_adapters == [name] and not layer.disable_adapters for _, layer in layers)
    if not ok:
        raise RuntimeError("train.shared_lora_base: this peft version keeps its active adapter elsewhere than "
                           f"{ACTIVE} / {DISABLED}; set train.shared_lora_base=false")


def adapter_enabled(layers, name: str | None):
    """Inside: adapter ``name`` is the one the layers compute with (None: none, the base alone)."""
    if name is None:
        return adapter_state(layers, [(getattr(layer, ACTIVE), True) for _, layer in layers])
    return adapter_state(layers, [([name], False) if name in layer.lora_A else (getattr(layer, ACTIVE), True)
                                  for _, layer in layers])


@contextlib.contextmanager
def training_mode(module: nn.Module, training: bool, modules: list[nn.Module] | None = None):
    """Inside: ``module`` (whose modules are ``modules``, when known) in training mode or not (a trainable
    copy computes in training mode, the frozen teacher in evaluation mode; some layers differ between
    the two); outside, as before."""
    modules = list(module.modules()) if modules is None else modules
    before = [m.training for m in modules]
    for m in modules:  # (what ``module.train`` sets, without its per-module ``__setattr__``)
        m.__dict__["training"] = training
    try:
        yield
    finally:
        for m, mode in zip(modules, before):
            m.__dict__["training"] = mode


class AdapterView(nn.Module):
    """One named adapter of a shared base network, called as a network of its own (see the module's
    docstring). Its parameters are the adapter's; ``unwrap`` reaches the base."""

    def __init__(self, base: nn.Module, name: str):
        super().__init__()
        object.__setattr__(self, "module", base)  # not a submodule: the view's parameters are its adapter's
        self.adapter_name = name
        self._layers = lora_layers(base)
        self.lora = nn.ModuleDict()
        for path, layer in self._layers:
            for kind in layer.adapter_layer_names:
                parts = getattr(layer, kind)
                if name not in parts:
                    continue
                if not isinstance(parts[name], nn.Module):
                    raise ValueError(f"a shared LoRA base: {path}.{kind} holds bare parameters (an embedding LoRA), "
                                     f"which a view cannot hold; set train.shared_lora_base=false")
                self.lora[f"{path}.{kind}".replace(".", "-")] = parts[name]
        if not len(self.lora):
            raise ValueError(f"the shared base has no adapter '{name}'")
        _check_switch(self._layers, name)

    def _base_modules(self) -> list[nn.Module]:
        """The base's modules, listed again when an adapter was added since (listing 2,400 is 10 ms)."""
        key = tuple(getattr(self.module, "peft_config", {}))
        if getattr(self, "_listed", (None,))[0] != key:
            self._listed = (key, list(self.module.modules()))
        return self._listed[1]

    def forward(self, *args, **kwargs):
        with adapter_enabled(self._layers, self.adapter_name), \
                training_mode(self.module, self.training, self._base_modules()):
            return self.module(*args, **kwargs)

    def __deepcopy__(self, memo):
        raise TypeError("an AdapterView shares its base with the teacher and is not copied; copy the base "
                        "(fused_copy) or train with train.shared_lora_base=false")


def _checkpoint(layers, module, *args):
    """diffusers' gradient checkpointing call, recomputing under the adapter state of the forward."""
    state, training = _state(layers), module.training

    def recompute():
        with adapter_state(layers, state), training_mode(module, training):
            yield

    return torch.utils.checkpoint.checkpoint(
        module.__call__, *args, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), contextlib.contextmanager(recompute)()))


def share_base(base: nn.Module) -> None:
    """Make ``base`` (a frozen network) ready to carry named adapters: its gradient checkpointing, when
    enabled later, recomputes under the adapter state each forward ran with."""
    if getattr(base, "_stepdistill_shared", False):
        return
    enable = base.enable_gradient_checkpointing

    def enable_gradient_checkpointing(gradient_checkpointing_func=None):
        enable(gradient_checkpointing_func or partial(_checkpoint, lora_layers(base)))

    base.enable_gradient_checkpointing = enable_gradient_checkpointing
    base._stepdistill_shared = True


def peft_init(name: str):
    """peft's ``init_lora_weights`` for ``student.lora_init``: ``default`` is peft's own (True: A
    kaiming-uniform, B zero; the official LCM-LoRA and SwiftBrush code), ``gaussian`` draws A from N(0, 1/r)."""
    if name not in ("default", "gaussian"):
        raise ValueError(f"student.lora_init must be default or gaussian, got {name!r}")
    return True if name == "default" else "gaussian"


def add_adapter_view(base: nn.Module, name: str, *, rank: int, alpha: float | None, targets,
                     init: str = "default") -> AdapterView:
    """Add LoRA adapter ``name`` (rank, alpha, target modules, initialisation ``init`` (:func:`peft_init`), as
    ``copy_for_training`` makes it) to the frozen ``base`` and return its view, trainable; the base's
    adapters stay disabled outside a view's call."""
    from peft import LoraConfig

    share_base(base)
    kept = [(p, p.requires_grad) for p in _adapter_parameters(lora_layers(base))]  # earlier adapters'
    names = [n for n, _ in base.named_modules()]
    found = [t for t in targets if any(n.endswith(t) for n in names)]
    if not found:
        raise ValueError(f"student.lora_targets {list(targets)} match no module of {type(base).__name__}")
    with warnings.catch_warnings():  # a second adapter on one network is the point here, not a mistake
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        base.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=found,
                                    init_lora_weights=peft_init(init)), adapter_name=name)
    base.disable_adapters()  # the network itself is the teacher
    for p, flag in kept:  # (peft's switching cleared them)
        p.requires_grad_(flag)
    view = AdapterView(base, name)
    view.requires_grad_(True)
    return view


def is_view(model: nn.Module) -> bool:
    return isinstance(model, AdapterView)


def own_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters a trainable module trains from: a view's (its adapter's), or the unwrapped module's."""
    return list((module if is_view(module) else unwrap(module)).parameters())


def adapter_name(model: nn.Module) -> str:
    """The peft adapter of a network: a view's name, or peft's ``default`` of a copy with its own adapter."""
    return model.adapter_name if is_view(model) else "default"


FORWARD_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                 "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def fused_view_copy(view: AdapterView) -> nn.Module:
    """A plain network: a copy of the base with the view's adapter merged into its weights and every
    adapter removed (what a LoRA copy gives with ``fuse_lora`` and ``unload_lora``)."""
    import copy

    # without the base's forward hooks (DMD2's feature capture on the fake score holds the last features)
    memo = {id(getattr(m, attr)): type(getattr(m, attr))() for m in view.module.modules() for attr in FORWARD_HOOKS}
    fused = copy.deepcopy(view.module, memo)
    others = [n for n in fused.peft_config if n != view.adapter_name]
    if others:
        with warnings.catch_warnings():  # peft names the deleted active adapter: the copy's own is set next
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            fused.delete_adapters(others)
    fused.set_adapter(view.adapter_name)
    fused.fuse_lora()
    fused.unload_lora()
    for attr in ("enable_gradient_checkpointing", "_stepdistill_shared"):
        fused.__dict__.pop(attr, None)
    return fused.requires_grad_(False)
