"""A third-party plugin, installed as its own distribution into a temporary environment, extends qdqkit.

The test writes a tiny setup.py-based distribution (a pass and a custom op, registered through the ``qdqkit``
entry-point group) plus a broken one, pip-installs both into a venv built on the current interpreter, and runs
that environment's qdqkit: ``passes`` / ``ops`` list the additions, ``apply`` runs them, the broken plugin is named
and does not take the CLI down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import venv

import onnx
import pytest
from onnx import TensorProto, helper

PLUGIN_SETUP = """
from setuptools import setup
setup(name="{name}", version="0.1", packages=["{pkg}"],
      entry_points={{"qdqkit": ["{ep} = {pkg}.plugin"]}})
"""

PLUGIN_CODE = '''
"""An example third-party qdqkit plugin: one custom op, one pass."""
import onnx
from onnx import helper
from qdqkit.customops import CustomOpSpec, IOSpec, TensorInfo
from qdqkit.hookspecs import hookimpl
from qdqkit.pass_infra import Pass, PassResult

F = ("tensor(float)",)


def _double(opset):
    return helper.make_function("ext", "ExtDoubleTRT", ["x"], ["y"], [helper.make_node("Add", ["x", "x"], ["y"])],
                                [helper.make_opsetid("", opset)])


class CountExtPass(Pass):
    """Counts ExtDoubleTRT nodes; never changes the model."""
    name = "count-ext-ops"
    summary = "count ExtDoubleTRT nodes (third-party example)"
    requires = frozenset({"custom-ops-known"})

    def run(self, model, ctx):
        n = sum(1 for node in model.proto.graph.node if node.op_type == "ExtDoubleTRT")
        return PassResult(False, {"ext_ops": n})


@hookimpl
def qdqkit_register_custom_ops(registry):
    registry.add(CustomOpSpec("ExtDoubleTRT", (IOSpec("x", F),), (IOSpec("y", F),), lambda i, a: [i[0]],
                              domain="ext.ops", function=_double))


@hookimpl
def qdqkit_register_passes(registry):
    registry.add(CountExtPass)
'''


def _write_dist(root, name, pkg, ep, code):
    (root / pkg).mkdir(parents=True)
    (root / "setup.py").write_text(PLUGIN_SETUP.format(name=name, pkg=pkg, ep=ep))
    (root / pkg / "__init__.py").write_text("")
    (root / pkg / "plugin.py").write_text(textwrap.dedent(code))


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("thirdparty")
    env_dir = root / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    _write_dist(root / "src-ext", "qdqkit-ext-example", "qdqkit_ext_example", "ext-example", PLUGIN_CODE)
    _write_dist(root / "src-broken", "qdqkit-broken-example", "qdqkit_broken_example", "broken-example",
                "import qdqkit_missing_dependency_xyz\n")
    for src in ("src-ext", "src-broken"):
        # the venv sees the system pip through system_site_packages
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", str(root / src)], check=True, capture_output=True, timeout=120,
                       cwd=root)
    return root, python


def _qdqkit(python, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "QDQKIT_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONPATH"] = ""
    cmd = [str(python), "-m", "qdqkit", "-p", "no:bevformer-ops", "-p", "no:bevformer-example", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=cwd)


def test_plugin_is_not_visible_outside_its_environment():
    from qdqkit.plugins import Session

    assert "count-ext-ops" not in Session.start().passes


def test_installed_plugin_adds_a_pass_and_an_op(plugin_env):
    root, python = plugin_env
    passes = _qdqkit(python, "passes", cwd=root)
    assert passes.returncode == 0, passes.stderr
    assert "count-ext-ops" in passes.stdout and "[plugin ext-example" in passes.stdout
    assert "detect-custom-ops" in passes.stdout  # the built-ins, loaded the same way
    warnings = [line for line in passes.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and "broken-example" in warnings[0] and "qdqkit_missing_dependency_xyz" in warnings[0]
    ops = _qdqkit(python, "ops", cwd=root)
    assert ops.returncode == 0 and "ext.ops::ExtDoubleTRT  [plugin ext-example]" in ops.stdout

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("ExtDoubleTRT", ["r"], ["d"], domain="ext.ops", name="double"),
         helper.make_node("Neg", ["d"], ["y"], name="neg")],
        "ext", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ext.ops", 1)])
    onnx.save(model, root / "ext.onnx")
    applied = _qdqkit(python, "apply", "ext.onnx", "-o", "out.onnx", "--report", "r.json", "-q", "--passes",
                      "detect-custom-ops,count-ext-ops,trt-plugin-domain,infer-shapes,simplify,check", cwd=root)
    assert applied.returncode == 0, applied.stderr
    report = json.loads((root / "r.json").read_text())
    assert report["passes"][1]["stats"] == {"ext_ops": 1}
    assert report["custom_ops"]["known"] == ["ext.ops::ExtDoubleTRT"]
    assert "skipped" not in report["passes"][4]["stats"]  # simplify ran through the third-party op's function
    out = onnx.load(root / "out.onnx")
    assert [(n.domain, n.op_type) for n in out.graph.node][1] == ("trt.plugins", "ExtDoubleTRT")


def test_blocking_the_plugin_by_name(plugin_env):
    root, python = plugin_env
    proc = _qdqkit(python, "-p", "no:ext-example", "passes", cwd=root)
    assert proc.returncode == 0 and "count-ext-ops" not in proc.stdout
