"""Multi-stage work: ``python -m distill_zoo pipeline=<name>`` runs a list of ordinary runs.

A pipeline config (``conf/pipeline/<name>.yaml``) names its stages in order::

    stages:
      hints:                                  # stage name (its folder: 1_hints/)
        overrides: [distiller=fitnets, distiller.hint_only=true]
      kd:
        init: hints                           # start from the weights stage "hints" ended with
        overrides: [distiller=kd]

Each stage is composed like a command line: the pipeline command's own overrides (data,
seed, epochs, ...) followed by the stage's ``overrides``. A stage may take

- ``teacher: <earlier stage>``: that stage's student (its architecture and its
  ``teacher_ckpt`` checkpoint: ``best`` by default, ``last``, or ``epoch=N`` from a stage
  run with ``save_every_n_epochs``) becomes this stage's teacher. A list of stages is an
  ensemble of their students (``with_command_teacher: true`` adds the command's teacher);
  a list of ``teacher_ckpt`` with ``route_epochs`` is a route of one stage's checkpoints,
  each teaching from its start epoch on (RCO);
- ``init: <earlier stage>``: this stage's student, and every distiller part of the same name
  and shape (a paraphraser, a connector), start from that stage's ``init_ckpt`` checkpoint
  (``last`` by default: an initialisation stage's validation accuracy says nothing);
- ``init_from_teacher: true``: this stage's student starts from the command's teacher's
  weights (trained on demand if needed): pruning a copy of the teacher (``prune_kd``);
- ``seed_offset: k``: the stage runs with ``seed + k`` (born-again generations differ).

Instead of ``stages``, a pipeline config may name a ``builder`` (``takd``, ``ban``, ``rco``,
``eskd``; see :mod:`distill_zoo.pipelines.recipes`) that writes the stages from a few keys.

Every stage runs in its own folder below the pipeline's. A finished stage (its
``metrics.json`` exists) is skipped when the pipeline runs again with ``resume=true``, and an
interrupted one continues from its ``last.ckpt``. ``pipeline.json`` holds one row per stage
(architecture, parameters, teacher, best val top-1, test top-1) and is rewritten after each.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from distill_zoo import build, train
from distill_zoo.config import compose
from distill_zoo.pipelines import recipes

log = logging.getLogger(__name__)

SUMMARY_FILE = "pipeline.json"
CHECKPOINT_CHOICES = ("best", "last", "epoch=<N>")
STAGE_KEYS = (
    "overrides",
    "teacher",
    "teacher_ckpt",
    "route_epochs",
    "with_command_teacher",
    "init",
    "init_ckpt",
    "init_from_teacher",
    "seed_offset",
)
PIPELINE_ONLY_KEYS = ("pipeline", "resume", "ckpt_path")
"""Overrides of the pipeline command that are not handed on to its stages."""


@dataclass(frozen=True)
class Stage:
    """One stage of a pipeline, as its config describes it."""

    name: str
    folder: str
    overrides: list[str] = field(default_factory=list)
    teacher: str | list[str] | None = None
    teacher_ckpt: str | list[str] = "best"
    route_epochs: list[int] | None = None
    with_command_teacher: bool = False
    init: str | None = None
    init_ckpt: str = "last"
    init_from_teacher: bool = False
    seed_offset: int = 0

    @property
    def teachers(self) -> list[str]:
        """The stages whose students teach this one."""
        if self.teacher is None:
            return []
        return [self.teacher] if isinstance(self.teacher, str) else list(self.teacher)


def parse_stages(node: DictConfig, cfg: DictConfig | None = None) -> list[Stage]:
    """The stages of a ``pipeline`` config node, checked: hand-offs name earlier stages.

    Args:
        node: The ``pipeline`` node: ``stages``, or a ``builder`` and its keys.
        cfg: The whole composed config, which builders read (teacher, epochs).
    """
    if node.get("builder"):
        stages_node = OmegaConf.create(recipes.build(node, cfg))
    else:
        stages_node = node.get("stages")
    if not stages_node:
        raise ValueError(
            "the pipeline config has no stages: give `stages: {<name>: {...}}` or a builder"
        )
    stages: list[Stage] = []
    for index, (name, spec) in enumerate(stages_node.items(), start=1):
        spec = OmegaConf.to_container(spec, resolve=True) if spec is not None else {}
        unknown = set(spec) - set(STAGE_KEYS)
        if unknown:
            raise ValueError(
                f"pipeline stage '{name}' has unknown keys {sorted(unknown)}: valid are "
                f"{', '.join(STAGE_KEYS)}"
            )
        stage = Stage(name=str(name), folder=f"{index}_{name}", **spec)
        _check_stage(stage, [s.name for s in stages])
        stages.append(stage)
    return stages


def _check_stage(stage: Stage, earlier: list[str]) -> None:
    for role, sources in (("teacher", stage.teachers), ("init", [stage.init] * bool(stage.init))):
        for source in sources:
            if source not in earlier:
                raise ValueError(
                    f"pipeline stage '{stage.name}' takes its {role} from '{source}', which is "
                    f"not an earlier stage (earlier stages: {earlier or 'none'})"
                )
    choices = stage.teacher_ckpt if isinstance(stage.teacher_ckpt, list) else [stage.teacher_ckpt]
    for role, choice in [*(("teacher", c) for c in choices), ("init", stage.init_ckpt)]:
        if not _valid_choice(choice):
            raise ValueError(
                f"pipeline stage '{stage.name}': {role}_ckpt must be one of "
                f"{CHECKPOINT_CHOICES}, got {choice!r}"
            )
    if stage.route_epochs is not None:
        if len(stage.teachers) != 1 or len(choices) != len(stage.route_epochs):
            raise ValueError(
                f"pipeline stage '{stage.name}': a route takes one teacher stage and one "
                f"teacher_ckpt per route epoch, got teacher={stage.teacher}, "
                f"teacher_ckpt={stage.teacher_ckpt}, route_epochs={stage.route_epochs}"
            )
    elif isinstance(stage.teacher_ckpt, list):
        raise ValueError(
            f"pipeline stage '{stage.name}': a list of teacher_ckpt needs route_epochs"
        )
    if stage.with_command_teacher and not stage.teachers:
        raise ValueError(
            f"pipeline stage '{stage.name}': with_command_teacher adds the command's teacher "
            "to teacher stages, but the stage names none"
        )


def _valid_choice(choice: str) -> bool:
    if choice in ("best", "last"):
        return True
    return isinstance(choice, str) and choice.startswith("epoch=") and choice[6:].isdigit()


def stage_base_overrides(overrides: list[str]) -> list[str]:
    """The pipeline command's overrides that every stage inherits."""
    return [
        o
        for o in overrides
        if o.split("=", 1)[0].lstrip("+~").split(".")[0] not in PIPELINE_ONLY_KEYS
    ]


def compose_stages(
    cfg: DictConfig, overrides: list[str]
) -> list[tuple[Stage, DictConfig, list[str]]]:
    """Every stage with its composed config and its overrides, before anything trains, so a
    bad stage fails at once rather than hours into the pipeline."""
    if cfg.get("ckpt_path"):
        raise ValueError(
            "ckpt_path= resumes a single run; to continue a pipeline, re-run the same command "
            "with resume=true"
        )
    base = stage_base_overrides(overrides)
    composed = []
    for stage in parse_stages(cfg.pipeline, cfg):
        stage_overrides = [*base, *stage.overrides]
        try:
            stage_cfg = compose(stage_overrides)
        except Exception as err:
            raise ValueError(f"pipeline stage '{stage.name}' does not compose: {err}") from err
        if stage.seed_offset:
            stage_cfg.seed = stage_cfg.seed + stage.seed_offset
        composed.append((stage, stage_cfg, stage_overrides))
    _warn_about_capacity(composed)
    return composed


def _warn_about_capacity(composed: list[tuple[Stage, DictConfig, list[str]]]) -> None:
    """Warns where a stage's student is larger than a stage that teaches it (a chain in the
    wrong order); counted on 10 classes and 3 channels, which is enough to compare."""
    sizes = {
        stage.name: build.count_parameters(build.build_model(stage_cfg.student, 10, 3))
        for stage, stage_cfg, _ in composed
    }
    for stage, _, _ in composed:
        for source in stage.teachers:
            if sizes[stage.name] > sizes[source]:
                log.warning(
                    "pipeline stage '%s' (%d parameters) is taught by stage '%s', which is "
                    "smaller (%d parameters): is the chain in the intended order?",
                    stage.name,
                    sizes[stage.name],
                    source,
                    sizes[source],
                )


def run(
    cfg: DictConfig, run_dir: str | Path, overrides: list[str], callbacks: list | None = None
) -> dict:
    """Runs the stages of ``cfg.pipeline`` in order in ``run_dir``; returns the last one's
    metrics plus ``stages``, the summary rows also written to ``pipeline.json``.

    Args:
        cfg: The composed config of the pipeline command (``pipeline`` set).
        run_dir: Output folder of the pipeline; stage ``i`` runs in ``<run_dir>/<i>_<name>``.
        overrides: The command's overrides; each stage is composed from them plus its own.
        callbacks: Extra Lightning callbacks for every stage (tests use them to interrupt).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    composed = compose_stages(cfg, overrides)
    for stage, stage_cfg, _ in composed:
        _train_teacher_on_demand(cfg, stage, stage_cfg)
    rows = {stage.name: _pending_row(stage, stage_cfg) for stage, stage_cfg, _ in composed}
    _write_summary(run_dir, rows)
    finished: dict[str, dict] = {}
    student_of: dict[str, DictConfig] = {}
    for stage, stage_cfg, stage_overrides in composed:
        stage_dir = run_dir / stage.folder
        _hand_over(stage, stage_cfg, finished, student_of)
        metrics_file = stage_dir / "metrics.json"
        if metrics_file.is_file():
            log.info("Stage %s already finished in %s: skipped", stage.name, stage_dir)
            metrics = json.loads(metrics_file.read_text())
        else:
            stage_cfg.resume = (stage_dir / "checkpoints" / "last.ckpt").is_file()
            _record_overrides(stage_dir, stage_overrides)
            log.info("Stage %s (%s) in %s", stage.name, stage_cfg.student.name, stage_dir)
            metrics = _run_stage(stage, stage_cfg, stage_dir, callbacks)
        finished[stage.name] = metrics
        student_of[stage.name] = stage_cfg.student
        rows[stage.name] = _finished_row(stage, stage_cfg, metrics)
        _write_summary(run_dir, rows)
    table = format_table(list(rows.values()))
    log.info("Pipeline summary (%s):\n%s", run_dir / SUMMARY_FILE, table)
    return {**finished[composed[-1][0].name], "stages": list(rows.values())}


def _run_stage(stage: Stage, stage_cfg: DictConfig, stage_dir: Path, callbacks) -> dict:
    try:
        return train.run(stage_cfg, stage_dir, callbacks)
    except (ValueError, FileNotFoundError) as err:
        # Name the stage: "does not fit CifarResNet" alone does not say where to look.
        raise type(err)(f"pipeline stage '{stage.name}' ({stage_dir}): {err}") from err


def _train_teacher_on_demand(cfg: DictConfig, stage: Stage, stage_cfg: DictConfig) -> None:
    """Trains (or finds cached) a stage's teacher named without a checkpoint, on the pipeline
    command's recipe, so that every stage sees the same teacher even when a stage changes
    ``epochs`` or ``sched`` for itself (an initialisation stage)."""
    if stage.teachers and not stage.with_command_teacher:
        return
    if not (build.needs_teacher(stage_cfg) or stage.init_from_teacher):
        return
    if not build.has_teacher(stage_cfg):
        if stage.init_from_teacher:
            raise ValueError(
                f"pipeline stage '{stage.name}' starts from the command's teacher, but "
                "teacher=none: choose one (teacher=<arch>, optionally teacher.ckpt=<file>)"
            )
        return
    if stage_cfg.teacher.get("ckpt"):
        return
    recipe = cfg.copy()
    recipe.teacher = stage_cfg.teacher
    stage_cfg.teacher.ckpt = str(train.ensure_teacher(recipe))


def _hand_over(
    stage: Stage,
    stage_cfg: DictConfig,
    finished: dict[str, dict],
    student_of: dict[str, DictConfig],
) -> None:
    """Points the stage's teacher and init at the checkpoints of the stages they name."""
    if stage.route_epochs is not None:
        (source,) = stage.teachers
        teacher = OmegaConf.to_container(student_of[source], resolve=True)
        paths = [_checkpoint(finished[source], c, source, stage) for c in stage.teacher_ckpt]
        stage_cfg.teacher = {**teacher, "ckpt": paths, "route_epochs": stage.route_epochs}
    elif stage.teachers:
        members = [
            {
                **OmegaConf.to_container(student_of[source], resolve=True),
                "ckpt": _checkpoint(finished[source], stage.teacher_ckpt, source, stage),
            }
            for source in stage.teachers
        ]
        if stage.with_command_teacher:
            members.insert(0, OmegaConf.to_container(stage_cfg.teacher, resolve=True))
        stage_cfg.teacher = members[0] if len(members) == 1 else {"members": members}
    if stage.init:
        stage_cfg.init_from = _checkpoint(finished[stage.init], stage.init_ckpt, stage.init, stage)
    elif stage.init_from_teacher:
        ckpt = stage_cfg.teacher.get("ckpt")
        if not isinstance(ckpt, str) or stage_cfg.teacher.get("members"):
            raise ValueError(
                f"pipeline stage '{stage.name}' starts from the command's teacher, which must be "
                f"one network with one checkpoint (got ckpt={ckpt}): pass teacher=<arch> "
                "teacher.ckpt=<file>, or none to train it on demand"
            )
        stage_cfg.init_from = ckpt


def _checkpoint(metrics: dict, which: str, source: str, stage: Stage) -> str:
    if which.startswith("epoch="):
        folder = Path(metrics["last_checkpoint"]).parent
        path = str(folder / f"epoch-{int(which[6:]):03d}.ckpt")
        hint = "run it with save_every_n_epochs=1 (and enough epochs)"
    else:
        path = metrics.get(f"{which}_checkpoint")
        hint = "re-run it (delete its metrics.json) or start the pipeline afresh"
    if not path or not Path(path).is_file():
        raise FileNotFoundError(
            f"pipeline stage '{stage.name}' needs the {which} checkpoint of stage '{source}', "
            f"but {path or 'none'} does not exist: {hint}"
        )
    return path


def _record_overrides(stage_dir: Path, overrides: list[str]) -> None:
    # Written where Hydra writes a command's overrides, so the report groups stages by them.
    hydra_dir = stage_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(overrides))


def _teacher_label(stage: Stage, stage_cfg: DictConfig) -> str:
    if not build.needs_teacher(stage_cfg):
        return "-"
    if stage.route_epochs is not None:
        return f"route of stage {stage.teacher} ({len(stage.route_epochs)} checkpoints)"
    if stage.teachers:
        sources = ", ".join(stage.teachers) + (" + teacher" if stage.with_command_teacher else "")
        if len(stage.teachers) + stage.with_command_teacher > 1:
            return f"ensemble of stages {sources} ({stage.teacher_ckpt})"
        return f"{stage_cfg.teacher.name} (stage {stage.teacher}, {stage.teacher_ckpt})"
    ckpt = stage_cfg.teacher.get("ckpt")
    return f"{stage_cfg.teacher.name} ({ckpt or 'trained on demand'})"


def _pending_row(stage: Stage, stage_cfg: DictConfig) -> dict:
    return {
        "stage": stage.name,
        "folder": stage.folder,
        "status": "pending",
        "student": stage_cfg.student.name,
        "distiller": stage_cfg.distiller._target_.rsplit(".", 1)[-1],
        "teacher": "-" if stage.teachers else _teacher_label(stage, stage_cfg),
        "init": stage.init and f"stage {stage.init} ({stage.init_ckpt})",
    }


def _finished_row(stage: Stage, stage_cfg: DictConfig, metrics: dict) -> dict:
    return {
        **_pending_row(stage, stage_cfg),
        "status": "done",
        "teacher": _teacher_label(stage, stage_cfg),
        "student_params": metrics.get("student_params"),
        "best_val_acc1": metrics.get("best_val_acc1"),
        "test_acc1_best": metrics.get("test_acc1_best"),
        "test_acc1_last": metrics.get("test_acc1_last"),
    }


def _write_summary(run_dir: Path, rows: dict[str, dict]) -> None:
    tmp = run_dir / (SUMMARY_FILE + ".tmp")
    tmp.write_text(json.dumps({"stages": list(rows.values())}, indent=2) + "\n")
    tmp.replace(run_dir / SUMMARY_FILE)


def format_table(rows: list[dict]) -> str:
    """The stage rows as a fixed-width text table."""
    columns = [
        ("stage", "stage"),
        ("student", "student"),
        ("student_params", "params"),
        ("distiller", "distiller"),
        ("teacher", "teacher"),
        ("best_val_acc1", "best val"),
        ("test_acc1_best", "test (best)"),
        ("test_acc1_last", "test (last)"),
    ]

    def cell(row: dict, key: str) -> str:
        value = row.get(key)
        if key == "stage" and row.get("status") != "done":
            return f"{value} ({row.get('status')})"
        if isinstance(value, float):
            return f"{100 * value:.2f}"
        return "-" if value is None else str(value)

    table = [[title for _, title in columns]]
    table += [[cell(row, key) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in table]
    return "\n".join(line.rstrip() for line in lines)
