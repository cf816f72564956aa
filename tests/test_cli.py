from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import typer
from helpers import tree_digest
from typer.testing import CliRunner

import wildreid.api
from wildreid.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


COMMANDS = ("synth", "shard", "inspect", "train", "mine", "eval", "export", "visualize", "embed", "search")


def test_help_lists_every_command_with_one_line():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    registered = set(typer.main.get_command(app).commands)
    assert registered == set(COMMANDS)  # a new command joins this list (and its help is checked below)
    for command in COMMANDS:
        line = next(line for line in result.output.splitlines() if f" {command} " in line)
        assert len(line.split(command, 1)[1].strip(" │")) > 10, line  # its one-line summary


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_its_options(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    params = typer.main.get_command(app).commands[command].params
    for option in (o for p in params for o in p.opts if o.startswith("--")):
        assert option in result.output, option


def test_synth_shard_inspect_end_to_end(tmp_path):
    data, shards = tmp_path / "data", tmp_path / "shards"
    args = ["--train-vehicles", "6", "--test-vehicles", "4", "--images-per-vehicle", "3", "--image-size", "48x48"]
    assert runner.invoke(app, ["synth", str(data), *args, "--preview", str(tmp_path / "grid.png")]).exit_code == 0
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (44 + 6 * 96, 6 * 96)  # a row per vehicle, room for 6 images each
    again = tmp_path / "again"
    assert runner.invoke(app, ["synth", str(again), *args]).exit_code == 0
    assert tree_digest(data) == tree_digest(again)
    result = runner.invoke(app, ["shard", str(data), str(shards)])
    assert result.exit_code == 0, result.output
    assert "VeRi-Wild official (auto-detected)" in result.output
    result = runner.invoke(app, ["inspect", str(shards), "--image-size", "32x16", "--json"])
    assert result.exit_code == 0, result.output
    import json

    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["train"]["samples"] == 18 and summary["train"]["vehicles"] == 6
    assert summary["query-large"]["samples"] == 4


@pytest.mark.parametrize(
    "args, code, text",
    [
        (["shard", "{tmp}/nowhere", "{tmp}/out"], 3, "does not exist"),
        (["shard", "{tmp}", "{tmp}/out"], 3, "matches no known dataset layout"),
        (["shard", "{tmp}", "{tmp}/out", "--max-bytes", "lots"], 2, "expected a size"),
        (["synth", "{tmp}/d", "--cameras", "1"], 2, "cameras"),
        (["synth", "{tmp}/d", "--image-size", "big"], 2, "HEIGHTxWIDTH"),
        (["inspect", "{tmp}"], 5, "no manifest.json"),
        (["shard", "--verify", "{tmp}"], 5, "no manifest.json"),
    ],
)
def test_errors_are_one_line_with_an_exit_code(tmp_path, args, code, text):
    result = runner.invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == code, result.output
    assert text in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")


@pytest.mark.slow
def test_non_editable_wheel_installs_the_namespaced_packages(tmp_path):
    """The package-dir mapping must hold in a built wheel, not only in the editable install."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("wildreid-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        zf.extractall(tmp_path / "site")
    for module in (
        "wildreid/cli.py",
        "wildreid/errors.py",
        "wildreid/core/errors.py",
        "wildreid/api/data.py",
        "wildreid/api/model.py",
        "wildreid/shards/writer.py",
        "wildreid/shards/synth.py",
        "wildreid/stores/__init__.py",
    ):
        assert module in names
    assert not any(n.split("/")[0] in ("core", "pipeline", "shards", "stores", "tests") for n in names)
    assert "wildreid = wildreid.cli:app" in entry_points
    site = tmp_path / "site"
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import wildreid, wildreid.shards.writer, wildreid.cli;"
        "assert wildreid.__file__.startswith(sys.argv[1]), wildreid.__file__; wildreid.shard, wildreid.train;"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(site)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_data_commands_start_without_torch():
    """`wildreid shard` and `wildreid synth` load neither torch nor faiss: the API loads a command's module on
    first use."""
    probe = (
        "import sys, wildreid.cli, wildreid.api as api; api.shard, api.synth;"
        "print(sorted(m for m in ('torch', 'torchvision', 'faiss') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        wildreid.api.nothing  # noqa: B018 - the attribute access is the test
