"""The plugin manager and the `Session` that holds the registries plugins fill.

Every plugin, the built-in passes included, comes from the ``qdqkit`` entry-point group (or from ``-p
module.path``) and is registered the same way. As in pytest:

* ``QDQKIT_DISABLE_PLUGIN_AUTOLOAD`` (any non-empty value) switches entry-point autoloading off;
* ``-p NAME`` loads a plugin even then: an entry-point name of the group, or else a module import path;
* ``-p no:NAME`` blocks the entry point (or module) called NAME.

A plugin that fails to import, implements a hook that does not exist, or raises while registering is dropped
and named in ``Session.failures``; the rest keeps working (a CLI command that needs the missing piece says so).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from qdqkit import hookspecs
from qdqkit.customops import CustomOpRegistry
from qdqkit.errors import UserError
from qdqkit.pass_infra import PassRegistry

ENTRY_POINT_GROUP = "qdqkit"
AUTOLOAD_ENV = "QDQKIT_DISABLE_PLUGIN_AUTOLOAD"


@dataclass
class PluginFailure:
    """A plugin that could not be used, and why (one line)."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"plugin '{self.name}' was not loaded: {self.reason}"


@dataclass
class PluginArgs:
    """What ``-p`` options asked for: plugins to load and names to block."""

    load: list[str] = field(default_factory=list)
    block: set[str] = field(default_factory=set)

    @classmethod
    def parse(cls, values: Iterable[str] | None) -> PluginArgs:
        args = cls()
        for value in values or ():
            value = value.strip()
            if value.startswith("no:"):
                name = value[3:].strip()
                if not name:
                    raise UserError("-p no: needs a plugin name, e.g. -p no:bevformer-ops")
                args.block.add(name)
            elif value:
                args.load.append(value)
            else:
                raise UserError("-p needs a plugin name or module path")
        return args


def autoload_disabled(env: dict[str, str] | None = None) -> bool:
    """Whether the environment switches entry-point autoloading off."""
    return bool((env if env is not None else os.environ).get(AUTOLOAD_ENV, "").strip())


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def get_plugin_manager(plugins: Sequence[str] | PluginArgs | None = None, *, autoload: bool | None = None,
                       failures: list[PluginFailure] | None = None) -> pluggy.PluginManager:
    """A plugin manager with the qdqkit hookspecs and every plugin that loads.

    ``plugins`` are ``-p`` values. ``autoload`` None follows ``QDQKIT_DISABLE_PLUGIN_AUTOLOAD``. Plugins that
    fail are appended to ``failures`` (when given) instead of raising; an explicitly requested ``-p`` plugin
    that fails raises ``UserError``.
    """
    args = plugins if isinstance(plugins, PluginArgs) else PluginArgs.parse(plugins)
    failures = failures if failures is not None else []
    if autoload is None:
        autoload = not autoload_disabled()
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)

    eps = {ep.name: ep for ep in _entry_points()}
    if autoload:
        for name, ep in eps.items():
            if name in args.block or ep.value.split(":")[0] in args.block:
                continue
            _register(pm, name, lambda ep=ep: ep.load(), failures)
    for requested in args.load:
        if requested in args.block:
            continue
        if pm.get_plugin(requested) is not None or pm.has_plugin(requested):
            continue
        if requested in eps:
            ok = _register(pm, requested, eps[requested].load, failures)
        else:
            if any(ep.value.split(":")[0] == requested for ep in eps.values()) and autoload:
                continue  # already loaded under its entry-point name
            ok = _register(pm, requested, lambda r=requested: importlib.import_module(r), failures)
        if not ok:
            raise UserError(f"{failures[-1]} (requested with -p {requested})")
    return pm


def _register(pm: pluggy.PluginManager, name: str, load: Any, failures: list[PluginFailure]) -> bool:
    try:
        module = load()
    except Exception as exc:  # a broken plugin must not take the CLI down
        failures.append(PluginFailure(name, f"import failed: {_describe(exc)}"))
        return False
    if pm.is_registered(module):
        return True
    try:
        pm.register(module, name=name)
    except Exception as exc:
        failures.append(PluginFailure(name, _describe(exc)))
        return False
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        pm.unregister(module)
        failures.append(PluginFailure(name, f"implements an unknown hook: {_describe(exc)}"))
        return False
    return True


class RegistrationSet:
    """Optional registries of other parts of the core, created only when their modules import."""

    OPTIONAL = {
        "rules": ("qdqkit.rules", "RuleRegistry", "qdqkit_register_rules"),
        "quant_backends": ("qdqkit.quant_backends", "QuantBackendRegistry", "qdqkit_register_quant_backends"),
    }


class Session:
    """The plugin manager plus the registries the plugins filled: passes, custom ops, recipes, rules, backends.

    Create one with ``Session.start(plugins=[...])``. ``failures`` names the plugins that were dropped.
    """

    def __init__(self, pm: pluggy.PluginManager, failures: list[PluginFailure]) -> None:
        from qdqkit.pipeline import RecipeRegistry

        self.pm = pm
        self.failures = failures
        self.passes = PassRegistry()
        self.custom_ops = CustomOpRegistry()
        self.recipes = RecipeRegistry()
        self.registries: dict[str, Any] = {
            "passes": self.passes,
            "custom_ops": self.custom_ops,
            "recipes": self.recipes,
        }
        self.missing_registries: dict[str, str] = {}
        for key, (module, cls_name, _) in RegistrationSet.OPTIONAL.items():
            try:
                self.registries[key] = getattr(importlib.import_module(module), cls_name)()
            except Exception as exc:  # the part of the core that owns it is absent or broken
                self.missing_registries[key] = _describe(exc)
        self._fill()

    @classmethod
    def start(cls, plugins: Sequence[str] | PluginArgs | None = None, *, autoload: bool | None = None) -> Session:
        """Load plugins (entry points unless disabled, plus ``-p`` values) and fill every registry."""
        failures: list[PluginFailure] = []
        pm = get_plugin_manager(plugins, autoload=autoload, failures=failures)
        return cls(pm, failures)

    @property
    def hook(self) -> Any:
        return self.pm.hook

    @property
    def rules(self) -> Any:
        return self.registries.get("rules")

    @property
    def quant_backends(self) -> Any:
        return self.registries.get("quant_backends")

    def _fill(self) -> None:
        calls = [("qdqkit_register_passes", self.passes), ("qdqkit_register_custom_ops", self.custom_ops),
                 ("qdqkit_register_recipes", self.recipes)]
        for key, (_, _, hook_name) in RegistrationSet.OPTIONAL.items():
            if key in self.registries:
                calls.append((hook_name, self.registries[key]))
        dropped: set[str] = set()
        for hook_name, registry in calls:
            caller = getattr(self.pm.hook, hook_name)
            # sorted by plugin name: registration order must not depend on pluggy's LIFO call order
            for impl in sorted(caller.get_hookimpls(), key=lambda i: i.plugin_name):
                if impl.plugin_name in dropped:
                    continue
                if hasattr(registry, "current_plugin"):
                    registry.current_plugin = impl.plugin_name
                try:
                    impl.function(registry)
                except Exception as exc:  # a broken plugin is dropped and named, not fatal
                    self.failures.append(PluginFailure(impl.plugin_name, f"{hook_name} failed: {_describe(exc)}"))
                    dropped.add(impl.plugin_name)
                    # take back what it registered so far, so a dropped plugin leaves nothing half-there
                    for _, reg in calls:
                        drop = getattr(reg, "drop_plugin", None)
                        if drop is not None:
                            drop(impl.plugin_name)
        for name in dropped:
            plugin = self.pm.get_plugin(name)
            if plugin is not None:
                self.pm.unregister(plugin)

    def plugin_names(self) -> list[str]:
        """Names of the plugins in use."""
        return sorted(name for name, _ in self.pm.list_name_plugin() if name is not None)

    def plugin_of(self, pass_name: str) -> str:
        return self.passes.origin(pass_name)

    def failure_note(self) -> str:
        """A hint to append to "unknown X" messages when some plugin failed to load."""
        if not self.failures:
            return ""
        return " (note: " + "; ".join(map(str, self.failures)) + ")"
