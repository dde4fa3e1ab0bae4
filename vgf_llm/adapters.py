"""Running one shared base model as different models: the reference (adapters off), one adapter, or a trunk cut
after its first layers. Every module that runs the base under another identity uses these two context managers."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def active_adapter(model, name: str | None):
    """Run with only adapter ``name`` active (``None``: no adapter, i.e. the reference); restore afterwards."""
    if not getattr(model, "_hf_peft_config_loaded", False):
        if name is not None:
            raise ValueError(f"the model has no adapter {name!r}")
        yield
        return
    previous = model.active_adapters()
    try:
        if name is None:
            model.disable_adapters()
        else:
            model.enable_adapters()
            model.set_adapter(name)
        yield
    finally:
        model.enable_adapters()
        model.set_adapter(previous if len(previous) > 1 else previous[0])


@contextlib.contextmanager
def first_layers(decoder, num_layers: int | None):
    """Run the decoder with only its first ``num_layers`` blocks (a cheaper value trunk); weights are shared."""
    if num_layers is None or num_layers >= len(decoder.layers):
        yield
        return
    full = decoder.layers
    decoder.layers = full[:num_layers]
    try:
        yield
    finally:
        decoder.layers = full
