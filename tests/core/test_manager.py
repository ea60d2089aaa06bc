"""The PassManager: fixpoint groups, fault isolation, verification modes, the report."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import init, make_model, tensor_input
from onnx import helper, numpy_helper

import onnxopt
from onnxopt.errors import OnnxoptError, VerificationError
from onnxopt.graph import GraphScope
from onnxopt.manager import PassManager
from onnxopt.passbase import Pass, PassContext, PassResult, Requirement
from onnxopt.pipeline import FixpointGroup


def _chain_model():
    return make_model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Add", ["a", "w"], ["b"]),
            helper.make_node("Sigmoid", ["x"], ["unused"]),
            helper.make_node("Identity", ["b"], ["y"]),
        ],
        [tensor_input("x", [2, 3])],
        [tensor_input("y", [2, 3])],
        [init("w", np.ones((2, 3), np.float32)), init("dead", np.zeros(4, np.float32))],
    )


class RemoveOneRelu(Pass):
    """Test pass: turns one Relu into Identity per run, to exercise fixpoint iteration."""

    name = "test_remove_one_relu"

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in scope.graph.node:
            if node.op_type == "Relu":
                node.op_type = "Identity"
                result.count("relu")
                break
        return result


class Crashes(Pass):
    """Test pass: mutates the graph, then raises (a pass bug)."""

    name = "test_crashes"

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        del scope.graph.node[:]
        raise RuntimeError("bug in pass")


class BreaksGraph(Pass):
    """Test pass: leaves a dangling reference behind."""

    name = "test_breaks_graph"

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        result = PassResult()
        scope.graph.node[0].input[0] = "does_not_exist"
        result.count("broken")
        return result


class ChangesNumbers(Pass):
    """Test pass: a wrong rewrite (Relu becomes Sigmoid)."""

    name = "test_changes_numbers"

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in scope.graph.node:
            if node.op_type == "Relu":
                node.op_type = "Sigmoid"
                result.count("wrong")
        return result


def test_fixpoint_group_repeats_until_stable():
    nodes = [helper.make_node("Relu", ["x" if i == 0 else f"r{i}"], [f"r{i + 1}"]) for i in range(3)]
    nodes.append(helper.make_node("Identity", ["r3"], ["y"]))
    model = make_model(nodes, [tensor_input("x", [2])], [tensor_input("y", [2])])
    result = PassManager([FixpointGroup([RemoveOneRelu()], max_iterations=10)]).run(model)
    iterations = [r.iteration for r in result.report.passes]
    assert iterations == [1, 2, 3, 4]
    assert [r.status for r in result.report.passes] == ["changed"] * 3 + ["unchanged"]
    assert all(n.op_type == "Identity" for n in model.graph.node)


def test_fixpoint_cap_warns():
    nodes = [helper.make_node("Relu", ["x" if i == 0 else f"r{i}"], [f"r{i + 1}"]) for i in range(5)]
    model = make_model(nodes, [tensor_input("x", [2])], [tensor_input("r5", [2])])
    result = PassManager([FixpointGroup([RemoveOneRelu()], name="g", max_iterations=2)]).run(model)
    assert any("still changing after 2" in w for w in result.report.warnings)


@pytest.mark.parametrize("bad_pass", [Crashes(), BreaksGraph()], ids=["raises", "breaks-graph"])
def test_failing_pass_is_rolled_back_and_the_rest_runs(bad_pass):
    model = _chain_model()
    before = model.SerializeToString()
    result = onnxopt.optimize(model, [bad_pass, "eliminate_dead_code"])
    statuses = {r.name: r.status for r in result.report.passes}
    assert statuses[bad_pass.name] == "rolled back"
    assert statuses["eliminate_dead_code"] == "changed"
    assert "Sigmoid" not in [n.op_type for n in result.model.graph.node]
    assert any(bad_pass.name in w for w in result.report.warnings)
    assert model.SerializeToString() == before, "optimize must not modify the caller's model"


def test_without_isolation_a_failing_pass_raises():
    with pytest.raises(OnnxoptError, match="pass .test_crashes. failed: RuntimeError: bug in pass"):
        PassManager([Crashes()], isolate=False).run(_chain_model())


def test_verify_each_names_the_diverging_pass():
    with pytest.raises(VerificationError, match="pass 'test_changes_numbers'"):
        onnxopt.optimize(_chain_model(), ["eliminate_dead_code", ChangesNumbers()], verify="each")


def test_verify_end_passes_for_a_correct_pipeline():
    result = onnxopt.optimize(_chain_model(), "lift_constants,eliminate_dead_code", verify="end")
    assert result.report.verification["passed"] is True


def test_report_records_counts_and_stats():
    result = onnxopt.optimize(_chain_model(), "eliminate_dead_code")
    (record,) = result.report.passes
    assert record.counts == {"nodes": 1, "initializers": 1}
    assert record.nodes == 3 and record.initializers == 1
    assert result.report.before.nodes == 4 and result.report.after.nodes == 3
    data = result.report.to_dict()
    assert data["passes"][0]["name"] == "eliminate_dead_code"


def test_unknown_target_and_verify_mode():
    with pytest.raises(OnnxoptError, match="unknown target"):
        PassManager([], target="tpu")
    with pytest.raises(OnnxoptError, match="verify mode"):
        PassManager([], verify="sometimes")  # type: ignore[arg-type]


def test_register_third_party_pass():
    from onnxopt.registry import get_pass, register_pass

    @register_pass
    class ThirdParty(Pass):
        """A plugin pass."""

        name = "test_third_party"

        def run_graph(self, scope, ctx):
            return PassResult()

    assert get_pass("test_third_party") is ThirdParty
    with pytest.raises(ValueError, match="two passes"):

        @register_pass
        class Clash(Pass):
            name = "test_third_party"


def test_passes_recurse_into_subgraphs_innermost_first():
    seen: list[str] = []

    class Record(Pass):
        name = "test_record"

        def run_graph(self, scope, ctx):
            seen.append(scope.graph.name)
            return PassResult()

    inner = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "inner", [], [tensor_input("t", [2])])
    outer_then = helper.make_graph(
        [helper.make_node("If", ["c"], ["u"], then_branch=inner, else_branch=inner)], "then", [], [tensor_input("u", [2])]
    )
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [tensor_input("e", [2])])
    model = make_model(
        [helper.make_node("If", ["c"], ["y"], then_branch=outer_then, else_branch=other)],
        [tensor_input("x", [2]), tensor_input("c", [], 9)],
        [tensor_input("y", [2])],
    )
    PassManager([Record()]).run(model)
    assert seen[-1] == "test" and seen.index("inner") < seen.index("then")


def test_requirements_are_checked_before_running():
    from onnxopt.errors import RequirementError
    from onnxopt.passbase import Requirement

    class NeedsCalibration(Pass):
        name = "test_needs_calibration"
        requires = frozenset({Requirement.CALIBRATION})

    class NeedsTarget(Pass):
        name = "test_needs_target"
        requires = frozenset({Requirement.TARGET})

    with pytest.raises(RequirementError, match="needs calibration data"):
        PassManager([NeedsCalibration()])
    with pytest.raises(RequirementError, match="needs a back-end target"):
        PassManager([NeedsTarget()])
    PassManager([NeedsTarget()], target="trt")


def test_entry_point_plugins_are_loaded(tmp_path, monkeypatch):
    import importlib

    from onnxopt import registry

    (tmp_path / "my_onnxopt_plugin.py").write_text(
        "from onnxopt import Pass, PassResult\n"
        "class PluginPass(Pass):\n"
        "    '''A pass from a plugin.'''\n"
        "    name = 'test_plugin_pass'\n"
        "    def run_graph(self, scope, ctx):\n"
        "        return PassResult()\n"
    )
    dist = tmp_path / "my_onnxopt_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-onnxopt-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[onnxopt.passes]\nplugin = my_onnxopt_plugin:PluginPass\nbroken = no_such_module:Nope\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr(registry, "_LOADED", False)
    assert registry.get_pass("test_plugin_pass").summary() == "A pass from a plugin."


class NotesEveryRun(Pass):
    """Test pass: changes nothing and leaves the same note each time it runs."""

    name = "test_notes_every_run"

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        return PassResult(notes=["the same note"], warnings=["the same warning"])


def test_a_note_repeated_by_fixpoint_iterations_is_reported_once():
    group = FixpointGroup([RemoveOneRelu(), NotesEveryRun()], name="g")
    result = onnxopt.optimize(_chain_model(), [group], isolate=False)
    assert len([r for r in result.report.passes if r.name == "test_notes_every_run"]) > 1
    assert result.report.notes == ["the same note"]
    assert result.report.warnings == ["the same warning"]
    data = result.report.to_dict()
    assert data["notes"] == ["the same note"] and data["warnings"] == ["the same warning"]


def test_cli_prints_notes_as_notes_and_warnings_as_warnings(tmp_path, monkeypatch):
    import onnx
    from click.testing import CliRunner

    from onnxopt import registry
    from onnxopt.cli import main

    monkeypatch.setitem(registry._REGISTRY, NotesEveryRun.name, NotesEveryRun)
    src = tmp_path / "in.onnx"
    onnx.save(_chain_model(), str(src))
    run = CliRunner().invoke(main, [str(src), str(tmp_path / "out.onnx"), "--passes", NotesEveryRun.name])
    assert run.exit_code == 0, run.output
    assert "note: the same note" in run.output and "WARNING: the same note" not in run.output
    assert "WARNING: the same warning" in run.output


class RebuildsUnchanged(Pass):
    """Test pass: rebuilds the node list (copying every node) without changing anything, and says so."""

    name = "test_rebuilds_unchanged"

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        ctx.view(scope.graph)  # a view of the nodes as they were
        nodes = list(scope.graph.node)
        del scope.graph.node[:]
        scope.graph.node.extend(nodes)
        return PassResult()


def test_a_view_is_rebuilt_after_an_unreported_rebuild_of_the_node_list():
    model = make_model(
        [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]), helper.make_node("Neg", ["b"], ["y"])],
        [tensor_input("x", [2, 3])],
        [tensor_input("y", [2, 3])],
    )
    result = onnxopt.optimize(model, [RebuildsUnchanged(), "eliminate_noops"], isolate=False)
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Neg"]
    assert result.model.graph.node[0].input[0] == "x"


def test_each_record_keeps_its_pass_notes():
    group = FixpointGroup([RemoveOneRelu(), NotesEveryRun()], name="g")
    result = onnxopt.optimize(_chain_model(), [group], isolate=False)
    records = [r for r in result.report.passes if r.name == "test_notes_every_run"]
    assert records and all(r.notes == ["the same note", "the same warning"] for r in records)
    assert result.report.to_dict()["passes"][-1]["notes"] == ["the same note", "the same warning"]


class RecordsTeacher(Pass):
    """Test pass needing a teacher: records the teacher's Add constant."""

    name = "test_records_teacher"
    requires = frozenset({Requirement.TEACHER})
    seen: list = []

    def run(self, model, ctx: PassContext) -> PassResult:
        RecordsTeacher.seen.append(None if ctx.teacher is None else numpy_helper.to_array(ctx.teacher.graph.initializer[0]).copy())
        return PassResult()


class ScalesWeight(Pass):
    """Test lossy pass: doubles the Add constant."""

    name = "test_scales_weight"
    lossy = True

    def run(self, model, ctx: PassContext) -> PassResult:
        result = PassResult()
        w = model.graph.initializer[0]
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 2, w.name))
        result.count("scaled")
        return result


def test_teacher_is_the_model_before_the_first_lossy_pass():
    RecordsTeacher.seen.clear()
    model = _chain_model()
    PassManager([ScalesWeight(), ScalesWeight(), RecordsTeacher()]).run(model)
    assert np.array_equal(RecordsTeacher.seen[-1], np.ones((2, 3), np.float32))
    assert np.array_equal(numpy_helper.to_array(model.graph.initializer[0]), 4 * np.ones((2, 3), np.float32))


def test_teacher_without_lossy_pass_and_explicit_teacher():
    RecordsTeacher.seen.clear()
    PassManager([RecordsTeacher(), ScalesWeight()]).run(_chain_model())
    assert np.array_equal(RecordsTeacher.seen[-1], np.ones((2, 3), np.float32))
    given = _chain_model()
    given.graph.initializer[0].CopyFrom(init("w", np.full((2, 3), 7, np.float32)))
    PassManager([ScalesWeight(), RecordsTeacher()], teacher=given).run(_chain_model())
    assert np.array_equal(RecordsTeacher.seen[-1], np.full((2, 3), 7, np.float32))


def test_no_teacher_copy_when_no_pass_needs_one():
    RecordsTeacher.seen.clear()
    manager = PassManager([ScalesWeight()])
    manager.run(_chain_model())
    assert not manager._needs_teacher


class NudgesWeight(Pass):
    """Test lossy pass: adds 1% to the Add constant (fails fp32 tolerance, passes int8)."""

    name = "test_nudges_weight"
    lossy = True
    tolerance = "int8"

    def run(self, model, ctx: PassContext) -> PassResult:
        result = PassResult()
        w = model.graph.initializer[0]
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float32(1.01), w.name))
        result.count("nudged")
        return result


class NudgesWeightExactly(NudgesWeight):
    """The same change claiming fp32 exactness (so verification must catch it)."""

    name = "test_nudges_weight_exactly"
    tolerance = "fp32"


def test_verification_uses_the_loosest_tolerance_of_the_passes_that_ran():
    result = PassManager([NudgesWeight()], verify="end").run(_chain_model())
    assert result.report.verification["precision"] == "int8" and result.report.verification["passed"]
    with pytest.raises(VerificationError):
        PassManager([NudgesWeightExactly()], verify="end").run(_chain_model())


class RecordsLater(Pass):
    """Test pass: records which passes run after it."""

    name = "test_records_later"
    seen: list = []

    def run(self, model, ctx: PassContext) -> PassResult:
        RecordsLater.seen.append(ctx.later)
        return PassResult()


def test_context_names_the_passes_of_later_steps():
    RecordsLater.seen.clear()
    PassManager([RecordsLater(), FixpointGroup([RecordsLater(), ScalesWeight()]), ScalesWeight()]).run(_chain_model())
    assert RecordsLater.seen[0] == {"test_records_later", "test_scales_weight"}
    assert RecordsLater.seen[1] == {"test_scales_weight"}
