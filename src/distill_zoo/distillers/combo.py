"""Several distillers at once, e.g. ``distiller=combo distiller.parts=[kd,at]``."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from distill_zoo.config import CONF_DIR, compose
from distill_zoo.distillers.base import DistillContext, Distiller, StepOutputs
from distill_zoo.tasks.base import TASKS


def load_part_config(name: str, overrides: dict | None = None):
    """The ``conf/distiller/<name>.yaml`` config with ``overrides`` merged in."""
    path = CONF_DIR / "distiller" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml") if p.stem != "combo")
        raise ValueError(f"unknown distiller part '{name}'; known: {', '.join(known)}")
    node = OmegaConf.load(path)
    if "defaults" in node:  # a config built on another (fitnets_fpn, det_kd_hints)
        node = compose([f"distiller={name}"]).distiller
    return OmegaConf.merge(node, overrides or {})


class Combo(Distiller):
    """Sums the loss terms of several methods, as the CIFAR-100 benchmark of Tian et al.
    (CRD, ICLR 2020) combines them: ``g*CE + a*KD + b*method``.

    The cross-entropy is counted once, here; each part's own ``ce_weight`` is set to 0. Each
    part keeps its other weights, which ``part_overrides`` can change, e.g.
    ``distiller.parts=[kd,at] +distiller.part_overrides.at.weight=500``.

    Args:
        parts: Names of ``conf/distiller/`` configs.
        part_overrides: Per-part hyper-parameters, ``{part name: {key: value}}``.
        ce_weight: Weight of the hard-label cross-entropy.
    """

    tasks = TASKS  # each part checks the task itself, naming the one that does not fit

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        context: DistillContext | None = None,
        parts: list[str],
        part_overrides: dict | None = None,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(student, teacher, context=context, ce_weight=ce_weight)
        if not parts:
            raise ValueError("distiller=combo needs parts, e.g. distiller.parts=[kd,at]")
        overrides = dict(part_overrides or {})
        unknown = set(overrides) - set(parts)
        if unknown:
            raise ValueError(f"part_overrides names {sorted(unknown)}, not among parts {parts}")
        self.parts = nn.ModuleDict()
        for name in parts:
            cfg = load_part_config(name, {**overrides.get(name, {}), "ce_weight": 0.0})
            self.parts[name] = instantiate(cfg, student=student, teacher=teacher, context=context)
        for name, part in self.parts.items():
            reason = part.runs_alone_because()
            if reason:
                raise ValueError(
                    f"distiller=combo cannot hold {name}: {reason}. Run distiller={name} alone"
                )
        # A part that changes how the step runs (its own student pass, a teacher pass after
        # the student's, an adversary) lends that to the whole; two such parts cannot share it.
        # Names, not modules: a second attribute holding a part would save its weights twice.
        self.pass_name = self._one_part(
            lambda p: (
                type(p).student_forward is not Distiller.student_forward or p.teacher_after_student
            ),
            "run their own forward passes",
        )
        self.teacher_after_student = bool(
            self.pass_name and self.parts[self.pass_name].teacher_after_student
        )
        self.adversarial_name = self._one_part(
            lambda p: p.adversary() is not None, "train an adversary"
        )

    def _one_part(self, has, what: str) -> str | None:
        found = [name for name, part in self.parts.items() if has(part)]
        if len(found) > 1:
            raise ValueError(f"parts {found} of distiller=combo both {what}: keep one of them")
        return found[0] if found else None

    def student_forward(self, task, student, images, targets, **context):
        if self.pass_name is None:
            return super().student_forward(task, student, images, targets, **context)
        return self.parts[self.pass_name].student_forward(
            task, student, images, targets, **context
        )

    def teacher_pass(self, teacher, out):
        return self.parts[self.pass_name].teacher_pass(teacher, out)

    def adversary(self):
        name = self.adversarial_name
        return None if name is None else self.parts[name].adversary()

    def adversary_optimizer(self, params):
        return self.parts[self.adversarial_name].adversary_optimizer(params)

    def adversary_terms(self, out):
        return self.parts[self.adversarial_name].adversary_terms(out)

    def before_training(self, trainer, teacher) -> None:
        for part in self.parts.values():
            part.before_training(trainer, teacher)

    def trains_only_part(self) -> bool:
        return any(part.trains_only_part() for part in self.parts.values())

    def layers(self) -> tuple[list[str], list[str]]:
        student, teacher = [], []
        for part in self.parts.values():
            s, t = part.layers()
            student += [n for n in s if n not in student]
            teacher += [n for n in t if n not in teacher]
        return student, teacher

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        for name, part in self.parts.items():
            for key, value in part(out).items():
                if key in terms:
                    raise ValueError(
                        f"parts of distiller=combo both return a '{key}' term "
                        f"(the second is '{name}'): keep one of them"
                    )
                terms[key] = value
        return terms
