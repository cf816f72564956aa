"""One rank of the distributed-mining check in tests/test_world.py, started by torchrun (gloo, CPU):
every rank mines its share of the blocks of one store; rank 0 saves the report."""

from __future__ import annotations

import json
import sys

from wildreid.mining import MineParams, mine
from wildreid.world import join_world, leave_world


def main(path: str, budget: int, k: int, adjacency: int, camera_penalty: float = 0.0) -> None:
    world = join_world("cpu", timeout_s=120)
    params = MineParams(k=k, adjacency=adjacency, camera_penalty=camera_penalty)
    report = mine(path, params, memory_budget=budget, workers=1, world=world)
    if world.main:
        print(json.dumps({"query_rows": report["blocks"]["query_rows"], "rule_rows": report["blocks"]["rule_rows"]}))
    leave_world(world)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), *map(float, sys.argv[5:6]))
