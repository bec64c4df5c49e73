"""Several distillers at once, e.g. ``distiller=combo distiller.parts=[kd,at]``."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from distill_zoo.config import CONF_DIR
from distill_zoo.distillers.base import ALL_TASKS, DistillContext, Distiller, StepOutputs


def load_part_config(name: str, overrides: dict | None = None):
    """The ``conf/distiller/<name>.yaml`` config with ``overrides`` merged in."""
    path = CONF_DIR / "distiller" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml") if p.stem != "combo")
        raise ValueError(f"unknown distiller part '{name}'; known: {', '.join(known)}")
    return OmegaConf.merge(OmegaConf.load(path), overrides or {})


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

    tasks = ALL_TASKS  # each part checks the task itself, naming the one that does not fit

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
