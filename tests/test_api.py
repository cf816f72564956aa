"""The Python API (``import wildreid``): named like the CLI's options, returning what ``--json`` carries,
raising the errors the CLI maps to exit codes."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import wildreid
from wildreid.cli import app
from wildreid.core.errors import ConfigError, ShardError, StoreError
from wildreid.stores import FeatureStore

COMMANDS = {  # CLI command -> API function
    "synth": "synth",
    "shard": "shard",
    "inspect": "inspect",
    "mine": "mine",
    "train": "train",
    "eval": "evaluate",
    "visualize": "visualize",
    "embed": "embed",
    "search": "search",
    "export": "export",
}
CLI_ONLY = {"as_json", "nproc_per_node"}  # --json prints the return value; --nproc-per-node starts processes
RENAMED = {"out_dir": "out", "out_png": "out", "fmt": "format"}  # argument names Python or typer reserve


def _command_params(name: str) -> set[str]:
    return {p.name for p in typer.main.get_command(app).commands[name].params}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_an_api_function_with_its_options_as_keywords(command):
    function = getattr(wildreid, COMMANDS[command])
    keywords = set(inspect.signature(function).parameters)
    options = {RENAMED.get(p, p) for p in _command_params(command)} - CLI_ONLY
    assert options <= keywords, f"{command}: options without a keyword: {options - keywords}"
    assert COMMANDS[command] in wildreid.__all__


def test_synth_shard_inspect_and_mine_return_what_the_json_lines_carry(tmp_path):
    summary = wildreid.synth(tmp_path / "data", train_vehicles=6, test_vehicles=4, images_per_vehicle=2, seed=3)
    assert summary["images"] == 20 and summary["train"] == {"vehicles": 6, "images": 12}
    manifest = wildreid.shard(tmp_path / "data", tmp_path / "shards", max_samples=8, max_bytes="8MiB")
    assert manifest["splits"]["train"]["num_samples"] == 12
    assert wildreid.shard(tmp_path / "shards", verify=True) == {"shards": str(tmp_path / "shards"), "problems": []}
    rows = wildreid.inspect(tmp_path / "shards", image_size=(32, 16))
    assert rows["train"]["samples"] == 12 and set(rows) == set(manifest["splits"])
    cli = CliRunner().invoke(app, ["inspect", str(tmp_path / "shards"), "--image-size", "32x16", "--json"])
    assert cli.exit_code == 0, cli.output
    from_cli = json.loads(cli.stdout.strip().splitlines()[-1])
    assert {s: r["samples"] for s, r in from_cli.items()} == {s: r["samples"] for s, r in rows.items()}

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    store = FeatureStore.create(tmp_path / "store", len(x), x.shape[1])
    store.write_rows(0, x)
    report = wildreid.mine(tmp_path / "store", k=11, adjacency=10, memory_budget="200MiB")
    assert report["n"] == 200 and report["memory_budget_bytes"] == 200 << 20 and report["k"] == 11


def test_api_errors_are_the_cli_exit_code_classes(tmp_path):
    with pytest.raises(ConfigError, match="either --query/--gallery"):
        wildreid.evaluate()
    with pytest.raises(ConfigError, match="expected --device cpu or cuda"):
        wildreid.embed(tmp_path, checkpoint=tmp_path / "m.pt", output=tmp_path / "o.zarr", device="tpu")
    with pytest.raises(ShardError):
        wildreid.inspect(tmp_path / "nothing")
    with pytest.raises(StoreError):
        wildreid.mine(tmp_path / "nothing", k=11, adjacency=10)
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(ConfigError, match="OUT"):
        wildreid.shard(bad)
