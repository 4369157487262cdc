"""The plugin manager: entry points, autoload switch, -p / -p no:, broken plugins, unknown hooks."""

from __future__ import annotations

import textwrap

import pytest

from qdqkit.errors import UserError
from qdqkit.plugins import PluginArgs, Session


def _dist(root, name, entry_points: dict[str, str], modules: dict[str, str]):
    """A real installed-distribution layout (dist-info + modules) on sys.path: what pip would leave behind."""
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[qdqkit]\n{lines}\n")
    for mod, source in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(source))


GOOD = """
    from qdqkit.hookspecs import hookimpl
    from qdqkit.pass_infra import Pass, PassResult

    class CountPass(Pass):
        '''Counts nodes; never changes the model.'''
        name = "count-nodes"
        summary = "count nodes"
        def run(self, model, ctx):
            return PassResult(False, {"nodes": model.node_count()})

    @hookimpl
    def qdqkit_register_passes(registry):
        registry.add(CountPass)
"""


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("QDQKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    return tmp_path


def test_builtins_come_from_the_entry_point_group(plugin_dir):
    session = Session.start()
    assert "builtin-passes" in session.plugin_names()
    assert session.passes.origin("detect-custom-ops") == "builtin-passes"
    assert "default" in session.recipes


def test_autoload_switch_and_explicit_loading(plugin_dir, monkeypatch):
    monkeypatch.setenv("QDQKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert len(Session.start().passes) == 0
    by_name = Session.start(["builtin-passes"])  # an entry-point name still works with autoload off
    assert "infer-shapes" in by_name.passes
    by_module = Session.start(["qdqkit.passes.plugin"])  # as does a module path
    assert "infer-shapes" in by_module.passes
    toy = Session.start(["qdqkit_toyops"])
    assert toy.custom_ops.lookup("", "ToyScaleTRT") is not None


def test_block_by_name(plugin_dir):
    _dist(plugin_dir, "goodplug", {"goodplug": "goodplug_mod"}, {"goodplug_mod": GOOD})
    assert "count-nodes" in Session.start().passes
    blocked = Session.start(["no:goodplug"])
    assert "count-nodes" not in blocked.passes and "goodplug" not in blocked.plugin_names()
    assert "detect-custom-ops" in blocked.passes


def test_broken_plugin_is_named_and_the_rest_works(plugin_dir):
    _dist(plugin_dir, "brokenplug", {"brokenplug": "brokenplug_mod"},
          {"brokenplug_mod": "import qdqkit_no_such_dependency\n"})
    _dist(plugin_dir, "typoplug", {"typoplug": "typoplug_mod"}, {"typoplug_mod": """
        from qdqkit.hookspecs import hookimpl

        @hookimpl
        def qdqkit_register_pases(registry):
            pass
    """})
    session = Session.start()
    failures = {f.name: f.reason for f in session.failures}
    assert "qdqkit_no_such_dependency" in failures["brokenplug"]
    assert "unknown hook" in failures["typoplug"] and "qdqkit_register_pases" in failures["typoplug"]
    assert "detect-custom-ops" in session.passes
    assert "typoplug" not in session.plugin_names()


def test_plugin_raising_while_registering_is_dropped(plugin_dir):
    _dist(plugin_dir, "dupplug", {"dupplug": "dupplug_mod"}, {"dupplug_mod": """
        from qdqkit.hookspecs import hookimpl
        from qdqkit.pass_infra import Pass

        class Clash(Pass):
            name = "detect-custom-ops"

        @hookimpl
        def qdqkit_register_passes(registry):
            registry.add(Clash)
    """})
    session = Session.start()
    failure = next(f for f in session.failures if f.name == "dupplug")
    assert "registered twice" in failure.reason and "builtin-passes" in failure.reason
    assert session.passes.origin("detect-custom-ops") == "builtin-passes"


def test_explicit_plugin_that_fails_is_a_user_error(plugin_dir):
    with pytest.raises(UserError, match="no_such_plugin_module.*requested with -p"):
        Session.start(["no_such_plugin_module"])


def test_plugin_args_parsing():
    args = PluginArgs.parse(["a.b", "no:c", " d "])
    assert args.load == ["a.b", "d"] and args.block == {"c"}
    with pytest.raises(UserError):
        PluginArgs.parse(["no:"])


def test_plugin_failing_half_way_leaves_nothing_behind(plugin_dir):
    _dist(plugin_dir, "halfplug", {"halfplug": "halfplug_mod"}, {"halfplug_mod": """
        from qdqkit.customops import CustomOpSpec, IOSpec
        from qdqkit.hookspecs import hookimpl
        from qdqkit.pass_infra import Pass, PassResult

        class HalfPass(Pass):
            name = "half-pass"
            def run(self, model, ctx):
                return PassResult(False)

        @hookimpl
        def qdqkit_register_passes(registry):
            registry.add(HalfPass)

        @hookimpl
        def qdqkit_register_custom_ops(registry):
            registry.add(CustomOpSpec("HalfOpTRT", (IOSpec("x", ("tensor(float)",)),),
                                      (IOSpec("y", ("tensor(float)",)),), lambda i, a: [i[0]]))
            raise RuntimeError("second op spec is broken")
    """})
    session = Session.start()
    failure = next(f for f in session.failures if f.name == "halfplug")
    assert "second op spec is broken" in failure.reason
    assert "half-pass" not in session.passes
    assert session.custom_ops.lookup("", "HalfOpTRT") is None
    assert "detect-custom-ops" in session.passes
