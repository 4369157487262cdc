"""Every hook qdqkit calls, in one place.

Plugins implement these with ``@qdqkit.hookspecs.hookimpl`` in a module named in the ``qdqkit`` entry-point
group. Built-in passes, BEVFormer's custom ops and the bundled example are registered the same way, so the
hooks below are the whole extension API: if a built-in needs something these hooks do not offer, the API is
missing it.

pluggy calls implementations last-registered-first; nothing here may depend on that order (the pass pipeline
is always an explicit list).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import numpy as np

    from qdqkit.calib import CalibrationSource
    from qdqkit.customops import CustomOpRegistry
    from qdqkit.model import ModelHandle
    from qdqkit.pass_infra import Pass, PassContext, PassRegistry, PassResult
    from qdqkit.pipeline import RecipeRegistry
    from qdqkit.quant_backends import QuantBackendRegistry
    from qdqkit.rules import RuleRegistry

PROJECT = "qdqkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def qdqkit_register_passes(registry: PassRegistry) -> None:
    """Add pass classes with ``registry.add(PassClass)``.

    Called once, when the plugin manager is set up, for every plugin. A pass name may be registered only once;
    a clash is reported naming both plugins. Return value ignored.
    """


@hookspec
def qdqkit_register_custom_ops(registry: CustomOpRegistry) -> None:
    """Add custom-op descriptions with ``registry.add(CustomOpSpec(...))``.

    Called once at set-up, for every plugin. Each spec is keyed by (domain, op_type) plus its aliases; the
    ``trt.plugins`` domain always resolves to the same spec. Return value ignored.
    """


@hookspec
def qdqkit_register_rules(registry: RuleRegistry) -> None:
    """Add named exclusion patterns (such as multi-head attention) with ``registry.add_pattern(...)``.

    Called once at set-up, for every plugin. Users refer to them as ``--exclude-pattern NAME``. Return value
    ignored.
    """


@hookspec
def qdqkit_register_recipes(registry: RecipeRegistry) -> None:
    """Add named pipelines with ``registry.add(Recipe(...))``.

    Called once at set-up, for every plugin. Users run them as ``qdqkit apply --recipe NAME``. Return value
    ignored.
    """


@hookspec
def qdqkit_register_quant_backends(registry: QuantBackendRegistry) -> None:
    """Add quantization back ends (the engine behind the ``qdq`` pass) with ``registry.add(name, backend)``.

    Called once at set-up, for every plugin. Return value ignored.
    """


@hookspec(firstresult=True)
def qdqkit_calibration_source(
    spec: str, inputs: dict[str, tuple[np.dtype, tuple[int, ...]]]
) -> CalibrationSource | None:
    """Turn a ``--calib`` argument into a stream of samples.

    Called when a pipeline needs calibration or validation data. ``spec`` is the user's string (a file path,
    or a plugin's own form such as ``"bevformer:frames=16"``); ``inputs`` maps each model input name to its
    dtype and static shape. Return a source if you recognise ``spec``, else None. The first non-None result
    wins; the built-in .npz / .npy-folder reader answers last.
    """


@hookspec
def qdqkit_before_pass(pass_: Pass, model: ModelHandle, ctx: PassContext) -> None:
    """Called just before each pass of a pipeline runs (instrumentation). Return value ignored."""


@hookspec
def qdqkit_after_pass(pass_: Pass, model: ModelHandle, ctx: PassContext, result: PassResult) -> None:
    """Called just after each pass of a pipeline ran, with its result (instrumentation). Return value ignored."""


