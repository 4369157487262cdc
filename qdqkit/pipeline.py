"""Pipelines: an explicit, ordered list of pass steps, checked before the run and instrumented during it.

A pipeline comes from ``--passes a,b,c``, from a named recipe (plugins add recipes through
``qdqkit_register_recipes``), or from a TOML file::

    [[pass]]
    name = "detect-custom-ops"

    [[pass]]
    name = "qdq"
    exclude_op_types = ["MatMul"]

Before anything runs, every step's options are built (unknown keys are rejected) and every ``requires`` is
checked against the facts the earlier steps ``provide``; a gap fails with a message naming the pass that
would provide the missing fact. While running, ``qdqkit_before_pass`` / ``qdqkit_after_pass`` fire around each
pass (the built-in instrumentation records time, peak memory and node/op-count changes through them);
``verify_each`` runs the checker after every pass that changed the model, and ``dump_dir`` receives the model
after each such pass.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser as a package
    import tomli as tomllib  # type: ignore[no-redef]

import onnx

from qdqkit.errors import PassContractError, UserError, ValidationFailed
from qdqkit.model import ModelHandle, run_checker, save_model
from qdqkit.pass_infra import Pass, PassContext, PassRegistry, PassResult

# keys of ``qdqkit apply`` flags that belong to the quantization / validation steps
QDQ_OPTION_KEYS = ("exclude_op_types", "exclude_nodes", "exclude_nodes_glob", "exclude_patterns", "calib_samples",
                   "high_precision", "plugin_precision", "backend")
VALIDATE_OPTION_KEYS = ("samples", "min_cosine")


@dataclass
class Step:
    """One pass of a pipeline and its options (a plain dict, turned into the pass's typed options).

    ``when`` makes a recipe step conditional: ``"calib"`` runs it only when calibration data was given.
    """

    pass_name: str
    options: dict[str, Any] = field(default_factory=dict)
    when: str | None = None


@dataclass
class Recipe:
    """A named pipeline that plugins register and users run with ``--recipe NAME``."""

    name: str
    description: str
    steps: list[Step]


class RecipeRegistry:
    """Recipes by name, filled through the ``qdqkit_register_recipes`` hook."""

    def __init__(self) -> None:
        self._recipes: dict[str, Recipe] = {}
        self._origin: dict[str, str] = {}
        self.current_plugin = "?"

    def add(self, recipe: Recipe) -> None:
        if recipe.name in self._recipes:
            raise PassContractError(
                f"recipe '{recipe.name}' registered twice: by plugin '{self._origin[recipe.name]}' and by "
                f"'{self.current_plugin}'"
            )
        self._recipes[recipe.name] = recipe
        self._origin[recipe.name] = self.current_plugin

    def get(self, name: str) -> Recipe:
        try:
            return self._recipes[name]
        except KeyError:
            known = ", ".join(sorted(self._recipes)) or "(none)"
            raise UserError(f"unknown recipe '{name}'; known recipes: {known}") from None

    def origin(self, name: str) -> str:
        return self._origin[name]

    def drop_plugin(self, plugin: str) -> None:
        """Forget every recipe the named plugin registered."""
        for name in [n for n, origin in self._origin.items() if origin == plugin]:
            del self._recipes[name], self._origin[name]

    def __contains__(self, name: object) -> bool:
        return name in self._recipes

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._recipes))

    def __len__(self) -> int:
        return len(self._recipes)


# -- building step lists --------------------------------------------------------------------------------------


def steps_from_names(text: str) -> list[Step]:
    """``"a,b,c"`` (spaces allowed) to steps without options."""
    names = [n.strip() for n in text.split(",")]
    if not any(names) or not all(names):
        raise UserError(f"--passes needs a comma-separated list of pass names, got {text!r}")
    return [Step(n) for n in names]


def steps_from_toml(path: str | Path) -> list[Step]:
    """Read ``[[pass]]`` tables (``name`` plus the pass's options) from a TOML file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pipeline config not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid TOML: {exc}") from None
    tables = data.get("pass")
    extra = sorted(set(data) - {"pass"})
    if extra:
        raise UserError(f"{path}: unknown top-level key(s) {', '.join(extra)}; write each step as a [[pass]] table")
    if not isinstance(tables, list) or not tables:
        raise UserError(f"{path}: no [[pass]] tables; each step is [[pass]] with name = \"...\" and its options")
    steps = []
    for i, table in enumerate(tables, 1):
        if not isinstance(table, dict) or not isinstance(table.get("name"), str):
            raise UserError(f"{path}: [[pass]] number {i} has no name = \"...\"")
        options = {k: v for k, v in table.items() if k != "name"}
        steps.append(Step(table["name"], options))
    return steps


def select_steps(steps: list[Step], *, calib: bool) -> list[Step]:
    """Drop conditional recipe steps whose condition does not hold."""
    out = []
    for s in steps:
        if s.when is None or (s.when == "calib" and calib):
            out.append(Step(s.pass_name, dict(s.options)))
        elif s.when != "calib":
            raise PassContractError(f"recipe step '{s.pass_name}' has unknown condition when={s.when!r}")
    return out


def merge_options(steps: list[Step], per_pass: dict[str, dict[str, Any]]) -> list[Step]:
    """Merge CLI options into the steps of the named passes (the CLI wins over recipe/TOML values)."""
    for s in steps:
        extra = per_pass.get(s.pass_name)
        if extra:
            s.options.update(extra)
    return steps


# -- running ----------------------------------------------------------------------------------------------


@dataclass
class StepRecord:
    """What one step did: the pass result plus the instrumentation figures."""

    name: str
    options: dict[str, Any]
    modified: bool
    stats: dict[str, Any]
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    dumped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.name, "options": self.options, "modified": self.modified, "seconds": self.seconds,
                "stats": self.stats, **self.figures, **({"dump": self.dumped} if self.dumped else {})}


class Pipeline:
    """An ordered list of passes, ready to run. Build with ``Pipeline(steps, passes)``; ``plan()`` checks it."""

    def __init__(self, steps: list[Step], passes: PassRegistry, *, hook: Any = None, verify_each: bool = False,
                 dump_dir: str | Path | None = None, initial_facts: set[str] | None = None) -> None:
        if not steps:
            raise UserError("the pipeline is empty; name at least one pass")
        self.steps = steps
        self.registry = passes
        self.hook = hook
        self.verify_each = verify_each
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.initial_facts = set(initial_facts or ())
        self.passes: list[Pass] = []
        self.plan()

    def plan(self) -> list[Pass]:
        """Instantiate every pass and check ``requires`` against what earlier steps provide."""
        passes = []
        for step in self.steps:
            cls = self.registry.get(step.pass_name)
            passes.append(cls(cls.make_options(step.options)))
        facts = set(self.initial_facts)
        for i, p in enumerate(passes):
            missing = sorted(set(p.requires) - facts)
            if missing:
                raise UserError(f"pass '{p.name}' (step {i + 1}) requires {self._explain(missing)}")
            facts -= set(p.invalidates)
            facts |= set(p.provides)
        self.passes = passes
        return passes

    def _explain(self, facts: list[str]) -> str:
        parts = []
        for fact in facts:
            providers = [n for n in self.registry if fact in self.registry.get(n).provides]
            hint = (f"add '{providers[0]}' before it" if len(providers) == 1 else
                    f"add one of {', '.join(repr(p) for p in providers)} before it" if providers else
                    "no registered pass provides it")
            parts.append(f"'{fact}', which no earlier step provides; {hint}")
        return "; ".join(parts)

    def run(self, model: ModelHandle, ctx: PassContext, records: list[StepRecord] | None = None) -> list[StepRecord]:
        """Run the passes in order on ``model``; returns one record per step.

        Records are appended to ``records`` (when given) as the steps finish, so a caller keeps those of the
        steps that ran when a later one raises; a step that fails validation gets its record too.
        """
        records = [] if records is None else records
        # every pass may hand the model to onnx (checker, shape inference, onnxsim): they must know the custom ops
        ctx.custom_ops.register_onnx_schemas()
        ctx.facts |= self.initial_facts
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
        total = len(self.passes)
        for i, (step, p) in enumerate(zip(self.steps, self.passes)):
            ctx.say(f"[{i + 1}/{total}] {p.name}")
            figures: dict[str, Any] = {}
            ctx.state.setdefault("_instrumentation", {})[i] = figures
            ctx.state["_step_index"] = i
            if self.hook is not None:
                self.hook.qdqkit_before_pass(pass_=p, model=model, ctx=ctx)
            start = time.perf_counter()
            try:
                result = p.run(model, ctx)
            except ValidationFailed as exc:
                records.append(StepRecord(p.name, dict(step.options), False, {**exc.stats, "failed": str(exc)},
                                          round(time.perf_counter() - start, 4), figures))
                raise
            seconds = time.perf_counter() - start
            if not isinstance(result, PassResult):
                raise PassContractError(f"pass '{p.name}' returned {type(result).__name__}, not a PassResult")
            if self.hook is not None:
                self.hook.qdqkit_after_pass(pass_=p, model=model, ctx=ctx, result=result)
            ctx.facts -= set(p.invalidates)
            ctx.facts |= set(p.provides)
            record = StepRecord(p.name, dict(step.options), result.modified, dict(result.stats), round(seconds, 4),
                                figures)
            if result.modified and self.verify_each:
                verify(model, p.name)
            if result.modified and self.dump_dir is not None:
                target = self.dump_dir / f"{i + 1:02d}-{p.name}.onnx"
                save_model(model.proto, target, external_data=model.source_external_data or _large(model))
                record.dumped = str(target)
            records.append(record)
        return records


def _large(model: ModelHandle) -> bool:
    from qdqkit.model import is_large

    return is_large(model.proto)


def verify(model: ModelHandle, after: str) -> None:
    """onnx.checker (with the registered custom-op schemas) on the model; raises ValidationFailed naming the pass."""
    try:
        run_checker(model.proto)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValidationFailed(f"after pass '{after}' the model fails the ONNX checker: {first}") from exc

