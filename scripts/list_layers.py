"""List the layer names of a model, with output shapes, to pick distillation layers.

python scripts/list_layers.py resnet20                 # a zoo model, CIFAR input
python scripts/list_layers.py resnet18 --torchvision --input 3x224x224 --depth 2
"""

from __future__ import annotations

import argparse

import torch

from distill_zoo.distillers.base import probe_shapes
from distill_zoo.distillers.taps import layer_names
from distill_zoo.models import create_model, torchvision_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "arch", help="zoo name (e.g. resnet20) or, with --torchvision, a torchvision name"
    )
    parser.add_argument("--torchvision", action="store_true", help="arch is a torchvision model")
    parser.add_argument("--input", default="3x32x32", help="CxHxW of one input (default 3x32x32)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--depth", type=int, default=None, help="only names this many levels deep")
    args = parser.parse_args()

    channels, height, width = (int(v) for v in args.input.split("x"))
    build = torchvision_model if args.torchvision else create_model
    model = build(args.arch, num_classes=args.classes, in_channels=channels)
    names = layer_names(model, max_depth=args.depth)
    shapes = probe_shapes(model, names, torch.zeros(2, channels, height, width))
    width_col = max(len(n) for n in names)
    for name in names:
        shape = shapes.get(name)
        print(
            f"{name:<{width_col}}  {type(model.get_submodule(name)).__name__:<20} "
            f"{'x'.join(map(str, shape[1:])) if shape else '(not called)'}"
        )


if __name__ == "__main__":
    main()
