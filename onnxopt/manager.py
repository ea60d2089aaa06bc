"""The PassManager: runs a pipeline of passes and fixpoint groups with checks and a report.

After each pass that changed the model, the manager checks the graph is still well
formed (names resolve, SSA, acyclic) and, when the model is small enough to checkpoint,
rolls a failing pass back and goes on (fault isolation) instead of stopping the run.
Verification can run at the end or after every pass; the latter names the first pass
whose output diverged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from onnx import ModelProto

from onnxopt.analysis import analyze
from onnxopt.errors import InvalidModelError, OnnxoptError, RequirementError, one_line
from onnxopt.graph import iter_scopes
from onnxopt.io import payload_bytes
from onnxopt.passbase import TARGETS, Pass, PassContext, PassResult, Requirement
from onnxopt.pipeline import FixpointGroup, Step, build_pipeline, step_passes
from onnxopt.report import PassRecord, Report
from onnxopt.toposort import sort_graph
from onnxopt.validate import check_names
from onnxopt.verify import loosest, require_pass

log = logging.getLogger("onnxopt")

VerifyMode = Literal["off", "end", "each"]
CHECKPOINT_LIMIT = 512 << 20  # models larger than this are not checkpointed per pass
TRT_MIN_OPSET = 17  # LayerNormalization exists from opset 17; TensorRT's parser takes it


@dataclass
class OptimizeResult:
    """The optimized model and the run's report."""

    model: ModelProto
    report: Report


ProgressCallback = Callable[[str, int, int], None]


@dataclass
class PassManager:
    """Runs ``steps`` (passes and fixpoint groups) over a model.

    ``verify`` is "off", "end" (compare final outputs with the original's) or "each"
    (compare after every changing pass). ``verifier`` supplies inputs and reference
    outputs (see :class:`onnxopt.verify.Verifier`); one is built from the input specs
    when needed and not given. ``isolate`` rolls back a pass that fails or breaks the
    graph and continues; without it such a pass stops the run with an error. ``teacher`` is the
    reference model of passes that re-fit to one (``reconstruct``); by default it is a copy of the
    model taken just before the first lossy pass (or before the first pass that needs it).
    """

    steps: list[Step]
    target: str = "portable"
    verify: VerifyMode = "off"
    verifier: Any = None
    isolate: bool = True
    progress: ProgressCallback | None = None
    stats_per_pass: bool = True
    calibration: Any = None
    opset: int | None = None
    teacher: ModelProto | None = None
    _report: Report = field(default_factory=Report, init=False)
    _can_checkpoint: bool = field(default=True, init=False)
    _needs_teacher: bool = field(default=False, init=False)
    _tolerances: set[str] = field(default_factory=set, init=False)  # of the passes that changed the model

    @classmethod
    def from_spec(cls, passes: str | Sequence[Any], **kwargs: Any) -> PassManager:
        """Build a manager from a pass string or list (see :func:`onnxopt.pipeline.build_pipeline`)."""
        return cls(build_pipeline(passes), **kwargs)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise OnnxoptError(f"unknown target '{self.target}' (choose from {', '.join(TARGETS)})")
        if self.verify not in ("off", "end", "each"):
            raise OnnxoptError(f"unknown verify mode '{self.verify}' (off, end or each)")
        self._add_opset_upgrade()
        self._check_requirements()

    def _add_opset_upgrade(self) -> None:
        """Put the requested (or the target's minimum) opset upgrade before the first step."""
        from onnxopt.registry import get_pass

        upgrades = []
        if self.opset is not None:
            upgrades.append(get_pass("upgrade_opset")(version=self.opset))
        if self.target == "trt" and (self.opset or 0) < TRT_MIN_OPSET:
            upgrades.append(get_pass("upgrade_opset")(version=TRT_MIN_OPSET, strict=False))
        self.steps[:0] = upgrades

    def _passes(self) -> list[Pass]:
        flat: list[Pass] = []
        for step in self.steps:
            flat.extend(step_passes(step))
        return flat

    def _check_requirements(self) -> None:
        """Fail before running anything when a pass needs what this run does not provide."""
        for p in self._passes():
            needs = p.required()
            if Requirement.CALIBRATION in needs and self.calibration is None:
                why = "" if Requirement.CALIBRATION in p.requires else " with the options given"
                raise RequirementError(f"pass '{p.name}' needs calibration data{why}; give it with --calib (or calibration= in Python)")
            if Requirement.TARGET in needs and self.target == "portable":
                raise RequirementError(f"pass '{p.name}' needs a back-end target; give --target trt, ort-cpu or ort-gpu")

    def run(self, model: ModelProto) -> OptimizeResult:
        """Optimize ``model`` in place and return it with the report."""
        started = time.perf_counter()
        report = self._report = Report()
        self._tolerances = set()
        ctx = PassContext(model, target=self.target, calibration=self.calibration, teacher=self.teacher)
        self._needs_teacher = self.teacher is None and any(Requirement.TEACHER in p.requires for p in self._passes())
        report.before = analyze(model, ctx.types)
        self._can_checkpoint = payload_bytes(model) <= CHECKPOINT_LIMIT
        if self.verify != "off" and self.verifier is None:
            from onnxopt.verify import Verifier

            self.verifier = Verifier.from_model(model)
        total = len(self._passes())
        done = 0
        for index, step in enumerate(self.steps, start=1):
            ctx.later = frozenset(p.name for later in self.steps[index:] for p in step_passes(later))
            if isinstance(step, FixpointGroup):
                for iteration in range(1, step.max_iterations + 1):
                    changed = False
                    for p in step.passes:
                        changed |= self._run_pass(p, ctx, index, iteration).modified
                    if not changed:
                        break
                else:
                    report.warnings.append(f"fixpoint group '{step.name}' still changing after {step.max_iterations} iterations")
                done += len(step.passes)
            else:
                self._run_pass(step, ctx, index, 1)
                done += 1
            if self.progress:
                self.progress("", done, total)
        report.after = analyze(model, ctx.types)
        if self.verify == "end":
            self._verify(model, "the optimized model")
        report.seconds = time.perf_counter() - started
        return OptimizeResult(model, report)

    def _run_pass(self, p: Pass, ctx: PassContext, step: int, iteration: int) -> PassResult:
        model = ctx.model
        if self.progress:
            self.progress(p.name, -1, -1)
        if self._needs_teacher and ctx.teacher is None and (p.lossy or Requirement.TEACHER in p.requires):
            ctx.teacher = ModelProto()
            ctx.teacher.CopyFrom(model)
        checkpoint = None
        if self.isolate and self._can_checkpoint:
            checkpoint = ModelProto()
            checkpoint.CopyFrom(model)
        t0 = time.perf_counter()
        try:
            result = p.run(model, ctx)
            if result.modified:
                ctx.invalidate(types=not p.preserves_types)
                _check_structure(model)
        except (OnnxoptError, RecursionError, MemoryError) as exc:
            if isinstance(exc, OnnxoptError) and not isinstance(exc, InvalidModelError):
                raise
            return self._rollback(p, ctx, checkpoint, exc, step, iteration, t0)
        except Exception as exc:  # fault isolation: a pass bug must not lose the model
            return self._rollback(p, ctx, checkpoint, exc, step, iteration, t0)
        seconds = time.perf_counter() - t0
        status = "changed" if result.modified else "unchanged"
        said = list(dict.fromkeys(result.notes + result.warnings))
        record = PassRecord(p.name, step, iteration, status, dict(result.counts), seconds, notes=said)
        self._fill_stats(record, ctx, result.modified)
        self._report.passes.append(record)
        for kept, new in ((self._report.notes, result.notes), (self._report.warnings, result.warnings)):
            seen = set(kept)  # a message repeated by later fixpoint iterations is reported once
            kept.extend(n for n in dict.fromkeys(new) if n not in seen)
        if result.modified:
            self._tolerances.add(p.tolerance)
            log.info("%s: %s (%.0f ms)", p.name, result.summary(), seconds * 1000)
            if self.verify == "each":
                self._verify(model, f"pass '{p.name}' (step {step}, iteration {iteration})")
        return result

    def _rollback(
        self, p: Pass, ctx: PassContext, checkpoint: ModelProto | None, exc: BaseException, step: int, iteration: int, t0: float
    ) -> PassResult:
        message = f"{type(exc).__name__}: {one_line(exc, 300)}"
        if not self.isolate:
            raise OnnxoptError(f"pass '{p.name}' failed: {message}") from exc
        if checkpoint is None:
            raise OnnxoptError(f"pass '{p.name}' failed and the model is too large to roll back: {message}") from exc
        log.debug("pass %s failed", p.name, exc_info=exc)
        ctx.model.CopyFrom(checkpoint)
        ctx.invalidate()
        record = PassRecord(p.name, step, iteration, "rolled back", {}, time.perf_counter() - t0, message=message)
        self._fill_stats(record, ctx, True)
        self._report.passes.append(record)
        self._report.warnings.append(f"pass '{p.name}' failed and was rolled back ({message})")
        log.warning("pass '%s' failed and was rolled back: %s", p.name, message)
        return PassResult()

    def _fill_stats(self, record: PassRecord, ctx: PassContext, changed: bool) -> None:
        if not self.stats_per_pass:
            return
        previous = self._report.passes[-1] if self._report.passes else None
        if not changed and previous is not None:
            for key in ("nodes", "initializers", "parameters", "weight_bytes", "flops"):
                setattr(record, key, getattr(previous, key))
            return
        stats = analyze(ctx.model, ctx.types, serialized_size=False)
        record.nodes, record.initializers, record.parameters = stats.nodes, stats.initializers, stats.parameters
        record.weight_bytes, record.flops = stats.weight_bytes, stats.flops

    def _verify(self, model: ModelProto, what: str) -> None:
        own = getattr(self.verifier, "precision", "fp32")
        wanted = loosest(own, *self._tolerances)  # a lossy pass ran: judge at its tolerance
        result = self.verifier.check(model) if wanted == own else self.verifier.check(model, wanted)
        self._report.verification = result.to_dict()
        require_pass(result, what)


def _check_structure(model: ModelProto) -> None:
    """Cheap post-pass check that the graph is still well formed; re-sorts nodes if needed."""
    check_names(model)
    for scope in iter_scopes(model.graph):
        sort_graph(scope.graph)
