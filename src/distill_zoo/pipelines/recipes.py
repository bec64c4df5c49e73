"""Stage lists written from a few keys: the multi-step methods of ``conf/pipeline/``.

A pipeline config with ``builder: <name>`` gets its ``stages`` from the function of that
name here; each returns ``{stage name: stage spec}`` in the form
:mod:`distill_zoo.pipelines.runner` documents. Architectures are named as in
``conf/student/`` (zoo names).
"""

from __future__ import annotations

import yaml
from omegaconf import DictConfig

from distill_zoo.config import CONF_DIR


def build(node: DictConfig, cfg: DictConfig | None) -> dict:
    """The stages of the pipeline config ``node`` (with ``builder``), for the command ``cfg``."""
    builders = {"takd": takd, "ban": ban, "rco": rco, "eskd": eskd, "prune_kd": prune_kd}
    name = node.builder
    if name not in builders:
        raise ValueError(f"unknown pipeline builder {name!r}: choose one of {sorted(builders)}")
    if cfg is None:
        raise ValueError(f"pipeline builder {name!r} needs the composed config")
    return builders[name](node, cfg)


def _distiller(node: DictConfig) -> list[str]:
    return [f"distiller={node.distiller}", *(node.get("distiller_overrides") or [])]


def _arch(model: DictConfig) -> list[str]:
    """Overrides that make ``student`` the architecture of the config node ``model``: the
    ``conf/student/`` choice that builds it, and its scalar constructor arguments (a teacher's
    ``output_stride=2`` stays 2)."""
    name = model.get("name")
    if str(model.get("_target_", "")).endswith("torchvision_model"):
        return ["student=torchvision", f"student.name={name}"]
    if not name:
        raise ValueError("the teacher config names no architecture (teacher=none?)")
    arguments = [
        f"student.{key}={_override_value(value)}"
        for key, value in model.items()
        if key not in ("_target_", "name", "ckpt")
        and (value is None or isinstance(value, (bool, int, float, str)))
    ]
    return [f"student={_student_choice(model)}", *arguments]


def _override_value(value: object) -> str:
    """A scalar as a Hydra override value: strings quoted (they may hold ``,`` or ``:``)."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _student_choice(model: DictConfig) -> str:
    """The ``conf/student/`` file that builds the same model as ``model`` (``_target_`` and
    ``name`` alike): ``resnet56`` for the zoo's ResNet-56, ``seg_fcn_resnet20`` for an FCN."""
    if (CONF_DIR / "student" / f"{model.name}.yaml").is_file():
        return str(model.name)
    for path in sorted((CONF_DIR / "student").glob("*.yaml")):
        node = yaml.safe_load(path.read_text()) or {}
        if node.get("_target_") == model.get("_target_") and node.get("name") == model.name:
            return path.stem
    raise ValueError(
        f"no conf/student/ config builds the teacher's architecture {model.name!r} "
        f"({model.get('_target_')}): add one, as conf/student/*.yaml do"
    )


def takd(node: DictConfig, cfg: DictConfig) -> dict:
    """Mirzadeh et al., "Improved Knowledge Distillation via Teacher Assistant" (AAAI 2020),
    https://arxiv.org/abs/1902.03393: teacher -> assistant(s) -> student, each step distilled
    with ``distiller``. ``assistants`` are zoo architectures, largest first; the teacher is the
    command's ``teacher=`` and the last step's student its ``student=``. With
    ``distillation_path: true`` every step learns from all larger models before it (the
    paper's distillation paths, Sec. 5): their averaged softened predictions, which for KD
    gives the same student gradient as averaging the KD losses."""
    assistants = list(node.assistants or [])
    if not assistants:
        raise ValueError("pipeline=takd needs at least one assistant: pipeline.assistants=[...]")
    stages: dict = {}
    earlier: list[str] = []
    for i, arch in enumerate([*assistants, None], start=1):
        name = f"assistant{i}_{arch}" if arch else "student"
        spec: dict = {"overrides": [*([f"student={arch}"] if arch else []), *_distiller(node)]}
        if earlier and node.distillation_path:
            spec.update(teacher=list(earlier), with_command_teacher=True)
        elif earlier:
            spec["teacher"] = earlier[-1]
        stages[name] = spec
        earlier.append(name)
    return stages


def ban(node: DictConfig, cfg: DictConfig) -> dict:
    """Furlanello et al., "Born-Again Neural Networks" (ICML 2018),
    https://arxiv.org/abs/1805.04770: generation 0 of ``student=`` trains on the labels; each
    of the next ``generations`` (same architecture, a new seed) is taught by the one before.
    ``ensemble: true`` adds a last stage taught by the ensemble of generations 1..N (its
    teacher accuracy is the BAN ensemble's), as in the paper's BAN ensembles."""
    if node.generations < 1:
        raise ValueError(f"pipeline=ban needs generations >= 1, got {node.generations}")
    stages: dict = {"gen0": {"overrides": ["distiller=none"]}}
    for k in range(1, node.generations + 1):
        stages[f"gen{k}"] = {
            "overrides": _distiller(node),
            "teacher": f"gen{k - 1}",
            "seed_offset": k,
        }
    if node.ensemble and node.generations >= 2:
        stages["ensemble"] = {
            "overrides": _distiller(node),
            "teacher": [f"gen{k}" for k in range(1, node.generations + 1)],
            "seed_offset": node.generations + 1,
        }
    return stages


def _teacher_stage(cfg: DictConfig) -> dict:
    """A stage training the command's teacher architecture on the labels, keeping a
    checkpoint after every epoch (``epoch-NNN.ckpt``)."""
    return {"overrides": [*_arch(cfg.teacher), "distiller=none", "save_every_n_epochs=1"]}


def rco(node: DictConfig, cfg: DictConfig) -> dict:
    """Jin et al., "Knowledge Distillation via Route Constrained Optimization" (ICCV 2019),
    https://arxiv.org/abs/1904.09149: the teacher is trained here, keeping a checkpoint per
    epoch; ``anchors`` of them, evenly spaced along its route and ending with its last, teach
    the student in order, each for an equal share of the student's epochs (the paper's
    equal-epoch interval strategy)."""
    n, epochs = int(node.anchors), int(cfg.epochs)
    if not 1 <= n <= epochs:
        raise ValueError(f"pipeline=rco needs 1 <= anchors <= epochs ({epochs}), got {n}")
    anchor_epochs = [round(epochs * (i + 1) / n) - 1 for i in range(n)]
    checkpoints = [f"epoch={e}" for e in anchor_epochs[:-1]] + ["last"]
    return {
        "teacher": _teacher_stage(cfg),
        "student": {
            "overrides": _distiller(node),
            "teacher": "teacher",
            "teacher_ckpt": checkpoints,
            "route_epochs": [round(epochs * i / n) for i in range(n)],
        },
    }


def eskd(node: DictConfig, cfg: DictConfig) -> dict:
    """Cho & Hariharan, "On the Efficacy of Knowledge Distillation" (ICCV 2019),
    https://arxiv.org/abs/1910.01348: the teacher is trained here; its checkpoint of epoch
    ``teacher_epoch`` (0-based; ``null``: its best) teaches, and the student distils only for
    its first ``kd_epochs`` epochs (``null``: all), then trains on the labels alone."""
    student_overrides = _distiller(node)
    if node.kd_epochs is not None:
        student_overrides.append(f"distill_epochs={node.kd_epochs}")
    teacher_epoch = node.teacher_epoch
    if teacher_epoch is not None and not 0 <= teacher_epoch < cfg.epochs:
        raise ValueError(
            f"pipeline=eskd: teacher_epoch={teacher_epoch} is outside the teacher's "
            f"{cfg.epochs} epochs (0-based)"
        )
    return {
        "teacher": _teacher_stage(cfg),
        "student": {
            "overrides": student_overrides,
            "teacher": "teacher",
            "teacher_ckpt": "best" if teacher_epoch is None else f"epoch={teacher_epoch}",
        },
    }


def prune_kd(node: DictConfig, cfg: DictConfig) -> dict:
    """Prune, then recover by distillation: a copy of the command's teacher (``source:
    teacher``; trained on demand when it has no ckpt) or of a trained student
    (``source: <checkpoint>``, the architecture of ``student=``) is pruned by ``prune``
    (:class:`~distill_zoo.shipping.prune.PruneSpec`) and fine-tuned with ``distiller``, the
    unpruned teacher teaching (``distiller: none``: plain fine-tuning, every pruning paper's
    baseline). With ``rounds: N`` each round prunes the previous round's fine-tuned network
    by the same fraction, ``1 - (1 - ratio) ** (1 / N)``, so that ``ratio`` of the MACs (or
    parameters) is gone after the last round (iterative pruning, Han et al., NIPS 2015)."""
    rounds = int(node.rounds)
    ratio = float(node.ratio)
    if rounds < 1:
        raise ValueError(f"pipeline=prune_kd needs rounds >= 1, got {rounds}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(
            f"pipeline=prune_kd needs 0 < ratio < 1 (the fraction removed), got {ratio}"
        )
    per_round = 1.0 - (1.0 - ratio) ** (1.0 / rounds)
    source = str(node.source)
    if source == "teacher":
        arch, first = _arch(cfg.teacher), {"init_from_teacher": True}
    else:
        arch, first = [], {"overrides": [f"init_from={source}"]}
    prune = [
        f"prune={node.method}",
        f"prune.ratio={per_round:.6f}",
        *(node.get("prune_overrides") or []),
    ]
    stages: dict = {}
    for k in range(1, rounds + 1):
        spec: dict = {"overrides": [*arch, *prune, *_distiller(node)]}
        if k == 1:
            spec["overrides"] = [*first.get("overrides", []), *spec["overrides"]]
            spec.update({key: v for key, v in first.items() if key != "overrides"})
        else:
            spec["init"] = f"round{k - 1}"
        stages[f"round{k}"] = spec
    return stages
