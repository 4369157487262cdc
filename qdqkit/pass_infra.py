"""The pass contract: what a pass declares, what it gets, what it returns.

A pass is a class with a kebab-case ``name`` (its CLI name), the facts it ``requires`` and ``provides``, a
dataclass of typed ``Options``, and ``run(model, ctx) -> PassResult``. It never reads CLI arguments, and it
never imports another pass: shared logic lives in the core.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from qdqkit.errors import PassContractError, UserError

if TYPE_CHECKING:
    from qdqkit.customops import CustomOpRegistry
    from qdqkit.model import ModelHandle

_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@dataclass
class NoOptions:
    """Options of a pass that takes none."""


@dataclass
class PassResult:
    """What a pass did. ``modified`` must be exact: callers skip work (dumps, checks) when it is False."""

    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class of every pass.

    Subclasses set ``name``, ``summary``, optionally ``requires`` / ``provides`` / ``invalidates`` (sets of fact
    names such as ``"custom-ops-known"`` or ``"shapes"``) and ``Options`` (a dataclass), and implement ``run``.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    @classmethod
    def make_options(cls, values: dict[str, Any] | None) -> Any:
        """Build this pass's typed options from a plain dict (CLI, TOML, recipe), rejecting unknown keys."""
        values = dict(values or {})
        known = {f.name: f for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UserError(
                f"pass '{cls.name}' has no option {', '.join(map(repr, unknown))}; "
                f"its options are: {', '.join(known) or '(none)'}"
            )
        return cls.Options(**values)

    def run(self, model: ModelHandle, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


class PassRegistry:
    """Pass classes by name, filled through the ``qdqkit_register_passes`` hook."""

    def __init__(self) -> None:
        self._passes: dict[str, type[Pass]] = {}
        self._origin: dict[str, str] = {}
        self.current_plugin = "?"

    def add(self, pass_cls: type[Pass]) -> None:
        name = getattr(pass_cls, "name", "")
        if not isinstance(name, str) or not _KEBAB.match(name):
            raise PassContractError(f"pass class {pass_cls.__qualname__} needs a kebab-case `name`, got {name!r}")
        if not (isinstance(pass_cls, type) and issubclass(pass_cls, Pass)):
            raise PassContractError(f"{pass_cls!r} registered as pass '{name}' does not derive from qdqkit Pass")
        if not dataclasses.is_dataclass(pass_cls.Options):
            raise PassContractError(f"pass '{name}': Options must be a dataclass")
        if name in self._passes and self._passes[name] is not pass_cls:
            raise PassContractError(
                f"pass '{name}' registered twice: by plugin '{self._origin[name]}' and by '{self.current_plugin}'"
            )
        self._passes[name] = pass_cls
        self._origin[name] = self.current_plugin

    def get(self, name: str) -> type[Pass]:
        try:
            return self._passes[name]
        except KeyError:
            raise UserError(
                f"unknown pass '{name}'; known passes: {', '.join(sorted(self._passes))} (see `qdqkit passes`)"
            ) from None

    def origin(self, name: str) -> str:
        return self._origin[name]

    def drop_plugin(self, plugin: str) -> None:
        """Forget every pass the named plugin registered (it failed part-way through registering)."""
        for name in [n for n, origin in self._origin.items() if origin == plugin]:
            del self._passes[name], self._origin[name]

    def __contains__(self, name: object) -> bool:
        return name in self._passes

    def __iter__(self):
        return iter(sorted(self._passes))

    def __len__(self) -> int:
        return len(self._passes)


@dataclass
class PassContext:
    """Everything a pass may use besides the model: registries, shared state, the report, a scratch folder.

    ``state`` carries results between passes (for example the custom-op census of ``detect-custom-ops``), keyed by
    the name of the pass that wrote them. ``facts`` are the facts established so far in this run.
    """

    custom_ops: CustomOpRegistry
    hook: Any  # the pluggy hook relay, for firstresult hooks such as qdqkit_calibration_source
    workdir: Path
    registries: dict[str, Any] = field(default_factory=dict)
    facts: set[str] = field(default_factory=set)
    state: dict[str, Any] = field(default_factory=dict)
    report: Any = None
    calib_spec: str | None = None
    progress: Any = None

    def say(self, message: str) -> None:
        """Progress line for long steps (a no-op when the CLI runs quietly)."""
        if self.progress is not None:
            self.progress(message)
