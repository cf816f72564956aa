"""The training run's memory plan (wildreid.run_budget) on its own: the split, the refusal, the activation count."""

from __future__ import annotations

import pytest
import torch

from wildreid.core.errors import ConfigError
from wildreid.model import build_model
from wildreid.run_budget import STEP_SLACK, WORKER_BYTES, activation_bytes, plan_run_memory

MiB = 1 << 20
PARTS = dict(
    process=700 * MiB,
    weights=40 * MiB,
    saved=1 * MiB,
    largest=MiB // 4,
    batch=16,
    extract_batch=256,
    image_bytes=3 * 64 * 32 * 4,
    extract_rows_bytes=2 * MiB,
    workers=2,
    least_rest=64 * MiB,
)


def test_the_split_adds_up_to_the_budget():
    plan = plan_run_memory(2048 * MiB, **PARTS, use_graph=True)
    training = 2 * 40 * MiB + 16 * MiB + 3 * PARTS["image_bytes"] * 16
    extraction = 2 * (MiB // 4) * 256 + 2 * PARTS["image_bytes"] * 256 + 2 * MiB
    assert plan.step == max(training, extraction) + STEP_SLACK
    assert plan.workers == 2 * (WORKER_BYTES + 3 * PARTS["image_bytes"] * 16)
    assert plan.rest == 2048 * MiB - plan.process - plan.step - plan.workers
    # caches, gathers and the graph share the rest while steps run; mining gets half once they are closed
    assert plan.cache + plan.gathers + plan.graph <= plan.rest // 2 + plan.rest // 8 + 1
    assert plan.mining == plan.rest // 2
    assert plan_run_memory(2048 * MiB, **PARTS, use_graph=False).graph == 0


def test_a_budget_too_small_names_the_smallest_that_works():
    with pytest.raises(ConfigError) as refused:
        plan_run_memory(512 * MiB, **PARTS, use_graph=False)
    message = str(refused.value)
    smallest = int(message.rsplit("is ", 1)[1].split()[0].replace(",", ""))
    assert "training process takes 700 MiB" in message and "\n" not in message
    plan_run_memory(smallest * MiB, **PARTS, use_graph=False)  # that budget works
    with pytest.raises(ConfigError):
        plan_run_memory((smallest - 1) * MiB, **PARTS, use_graph=False)  # and it is the smallest


def test_activations_are_counted_without_changing_the_model():
    torch.manual_seed(0)
    model = build_model("resnet18")
    before = {name: b.clone() for name, b in model.named_buffers()}
    rng = torch.get_rng_state()
    saved, largest = activation_bytes(model, (64, 32), "cpu")
    assert all(torch.equal(b, before[name]) for name, b in model.named_buffers())  # BatchNorm statistics kept
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # one 64 x 32 image: the stem's 64 x 32 x 16 float32 map is the largest saved tensor, and the weights
    # (which every layer saves too) are not counted
    assert largest == 64 * 32 * 16 * 4
    assert largest < saved < weights
    bigger, _ = activation_bytes(model, (128, 64), "cpu")
    assert 3.5 * saved < bigger < 4.5 * saved  # activations grow with the pixels
