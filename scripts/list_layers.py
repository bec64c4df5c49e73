"""List the layer names of a model, with output shapes, to pick distillation layers.

python scripts/list_layers.py resnet20                 # a zoo model, CIFAR input
python scripts/list_layers.py resnet18 --torchvision --input 3x224x224 --depth 2
python scripts/list_layers.py fcn_resnet20 --task segmentation --input 3x64x64
python scripts/list_layers.py fasterrcnn_resnet8 --task detection --depth 3
python scripts/list_layers.py --config conf/student/seg_psp_resnet56.yaml
python scripts/list_layers.py --config conf/teacher/mlp_large.yaml --input 8   # 8 features

Each line: layer name, module type, and the output of one forward pass on a batch of two zero
inputs (eval mode): C x H x W for a tensor, else the type of what the layer returns (only
tensor outputs can be distilled), "(not called)", or the number of calls of a shared layer.
With --config, the config's feature_layers are marked with '*'.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from distill_zoo.models import create_model, detection_model, segmentation_model, torchvision_model

META_KEYS = ("feature_layers", "ckpt", "route_epochs", "members")
"""Config keys that describe a model rather than construct it."""

TASK_BUILDERS = {
    "classification": create_model,
    "segmentation": segmentation_model,
    "detection": detection_model,
}


def layer_names(model: nn.Module, max_depth: int | None = None) -> list[str]:
    """Names of the submodules of ``model`` in order, at most ``max_depth`` levels deep."""
    names = [name for name, _ in model.named_modules() if name]
    if max_depth is not None:
        names = [n for n in names if n.count(".") < max_depth]
    return names


def describe(output: Any) -> str:
    """``CxHxW`` for a tensor (batch dimension dropped), else the type of ``output``."""
    if isinstance(output, torch.Tensor):
        return "x".join(map(str, output.shape[1:])) or "scalar"
    if isinstance(output, Mapping | list | tuple):
        return f"{type(output).__name__}[{len(output)}] (not a tensor)"
    return f"{type(output).__name__} (not a tensor)"


def probe(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, tuple[str, int]]:
    """What each layer of ``names`` returns on ``example`` (first call), and how often it ran.

    One forward pass in eval mode without gradients; the model's mode is restored.
    """
    seen: dict[str, tuple[str, int]] = {}

    def hook(name: str):
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            first, calls = seen.get(name, (describe(output), 0))
            seen[name] = (first, calls + 1)

        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return seen


def load_config(path: Path) -> dict:
    """A ``conf/<student|teacher>/<name>.yaml`` composed by Hydra (so a teacher's ``defaults``
    resolve), as a plain dict."""
    from hydra import compose, initialize_config_dir

    path = path.resolve()
    group, choice, root = path.parent.name, path.stem, path.parent.parent
    with initialize_config_dir(config_dir=str(root), version_base="1.3"):
        cfg = compose(overrides=[f"+{group}={choice}"])
    return OmegaConf.to_container(cfg[group], resolve=True)


def default_input(target: str) -> str:
    """The input of a listing when --input is not given, by the model's constructor."""
    if target.endswith("regression.MLP"):
        return "16"
    if ".segmentation." in target or ".detection." in target:
        return "3x64x64"
    return "3x32x32"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "arch",
        nargs="?",
        help="zoo name (e.g. resnet20); with --torchvision a torchvision name; with --task a "
        "segmentation or detection model name (fcn_resnet20, fasterrcnn_resnet8, ...)",
    )
    parser.add_argument("--torchvision", action="store_true", help="arch is a torchvision model")
    parser.add_argument(
        "--task",
        choices=sorted(TASK_BUILDERS),
        default="classification",
        help="which builder arch is for (default classification: the CIFAR zoo)",
    )
    parser.add_argument(
        "--config", type=Path, help="a conf/student or conf/teacher YAML to instantiate instead"
    )
    parser.add_argument(
        "--input",
        default=None,
        help="CxHxW of one input, or F (features) for tabular models (default 3x32x32; "
        "3x64x64 for segmentation and detection; 16 for an MLP)",
    )
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--depth", type=int, default=None, help="only names this many levels deep")
    args = parser.parse_args(argv)
    if (args.arch is None) == (args.config is None):
        parser.error("give either an arch or --config")

    marked: set[str] = set()
    if args.config is not None:
        node = load_config(args.config)
        marked = set(node.get("feature_layers") or [])
        spec = args.input or default_input(node["_target_"])
    else:
        spec = args.input or ("3x32x32" if args.task == "classification" else "3x64x64")
    dims = [int(v) for v in spec.split("x")]
    channels = dims[0]

    if args.config is not None:
        from hydra.utils import instantiate

        kwargs = {k: v for k, v in node.items() if k not in META_KEYS}
        model = instantiate(kwargs, num_classes=args.classes, in_channels=channels)
    else:
        build = torchvision_model if args.torchvision else TASK_BUILDERS[args.task]
        model = build(args.arch, num_classes=args.classes, in_channels=channels)

    names = layer_names(model, max_depth=args.depth)
    names += [n for n in layer_names(model) if n in marked and n not in names]  # any depth
    names.sort(key=layer_names(model).index)
    outputs = probe(model, names, torch.zeros(2, *dims))
    name_col = max(len(n) for n in names)
    type_col = max(20, *(len(type(model.get_submodule(n)).__name__) for n in names))
    for name in names:
        output, calls = outputs.get(name, ("(not called)", 1))
        calls_note = f"  ({calls} calls)" if calls > 1 else ""
        mark = ("*" if name in marked else " ") if args.config is not None else ""
        print(
            f"{mark}{name:<{name_col}}  {type(model.get_submodule(name)).__name__:<{type_col}} "
            f"{output}{calls_note}"
        )


if __name__ == "__main__":
    main()
