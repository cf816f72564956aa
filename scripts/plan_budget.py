"""The smallest `wildreid train --memory-budget` for a configuration and a data set size, without the data.

    python scripts/plan_budget.py --config configs/veriwild.yaml --images 277797
    python scripts/plan_budget.py --config configs/demo.yaml --images 1600 --set train.workers=2

Builds the configuration's model and optimizer in this process (what the run's
plan measures), then asks the run's own planner (``wildreid.training._plan_memory``)
under a budget far too small, and prints its refusal: the parts and the
smallest budget that works. The process measured is this one, so it is close to, not
exactly, what a `wildreid train` process measures.
"""

from __future__ import annotations

import argparse

import torch

from wildreid.config import load_config
from wildreid.core.errors import ConfigError
from wildreid.model import build_model
from wildreid.training import _plan_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--images", type=int, required=True, help="rows of the dictionary (training images)")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    model = build_model(config.model.arch, last_stride=config.model.last_stride)
    tc = config.train
    torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum)
    device = torch.device(args.device)
    model.to(device)
    use_graph = config.loss.negatives == "graph"
    try:
        _plan_memory(1 << 20, model, args.images, config, device, use_graph)
    except ConfigError as refused:
        print(refused)


if __name__ == "__main__":
    main()
