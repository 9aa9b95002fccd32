"""One plan from advise to action: advise prints it, auto runs it, the printed command reproduces it."""

import json
import shlex
from dataclasses import asdict, fields
from enum import Enum
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.options import FINETUNE, TRAIN, ExtractOptions, TrainOptions, command_line, preset
from cnnkit.options import Strategy
from conftest import make_class_tree

runner = CliRunner()
CELLS = {
    Strategy.linear_top: {"data": "little", "domain": "similar"},
    Strategy.linear_stages: {"data": "little", "domain": "different"},
    Strategy.finetune_few: {"data": "lot", "domain": "similar"},
    Strategy.finetune_many: {"data": "lot", "domain": "different"},
    Strategy.train_scratch: {"data": "lot", "domain": "different"},
}


def _plain(options) -> dict:
    return {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(options).items()}


@pytest.fixture
def captured(monkeypatch):
    """Replace the two runners by recorders of the options they are given."""
    import cnnkit.extraction
    import cnnkit.plan
    import cnnkit.training.fit

    calls = []
    metrics = {"cv_accuracy": None, "train_accuracy": None, "val_accuracy": None, "best_epoch": 0}
    result = SimpleNamespace(run_path=Path("RUN"), metrics=metrics, tried=[], layers=["top"], head="logreg", feature_dims=1,
                             fitted=SimpleNamespace(best_params={}), counts={}, computed=0,
                             seconds={"features": 0.0, "head": 0.0}, skipped=[], interrupted=False,
                             dataset=SimpleNamespace(source=Path("data"), excluded=[], unmatched=0),
                             diagnosis=[], sanity=None, weights_digest="")

    def fake_extract(data, options, out=None, force=False, **kwargs):
        calls.append(("extract", options))
        return result

    def fake_training(data, options, out, force=False, **kwargs):
        calls.append((str(options.mode), options))
        return result

    def fake_ensemble(plan, out, force, dataset, attach, report, progress):
        for member in plan.members:
            member.run(out, force, dataset=dataset)
        return result

    monkeypatch.setattr(cnnkit.extraction, "run_extract", fake_extract)
    monkeypatch.setattr(cnnkit.training.fit, "run_training", fake_training)
    monkeypatch.setattr(cnnkit.plan.Plan, "_run_ensemble", fake_ensemble)
    return calls


def _steps(plan: dict) -> list[tuple[str, dict]]:
    """(command, options) of each run a plan makes: an ensemble's members, in order."""
    return [(m["command"], m["options"]) for m in plan.get("members", [])] or [(plan["command"], plan["options"])]


@pytest.mark.parametrize("strategy", list(Strategy))
def test_advise_json_auto_and_the_printed_command_agree(strategy, tmp_path, monkeypatch, captured):
    import cnnkit.advise

    data = make_class_tree(tmp_path / "data", {"x": 6, "y": 6}, size=40)
    # The measurements are the slow part and are tested elsewhere; here every cell is forced in turn.
    monkeypatch.setattr(cnnkit.advise, "similarity_signals",
                        lambda spec, images: ({"mean": 0.5}, {"top1": 0.5, "entropy": 0.5}))
    monkeypatch.setattr(cnnkit.advise, "decide", lambda *args: (CELLS[strategy], strategy, ["forced"]))
    # The time left differs between the two calls (the first imports TensorFlow); the plans must not.
    monkeypatch.setattr(cnnkit.advise, "_training_seconds", lambda seconds_left: 540.0)

    advised = runner.invoke(app, ["advise", str(data), "--json"])
    assert advised.exit_code == 0, advised.output
    plan = json.loads(advised.stdout)["plan"]
    assert plan["strategy"] == strategy.value

    ran = runner.invoke(app, ["auto", str(data), "--out", str(tmp_path / "run"), "--json"])
    assert ran.exit_code == 0, ran.output
    assert [(command, _plain(options)) for command, options in captured] == _steps(plan)
    assert json.loads(ran.stdout)["plan"]["command_line"] == plan["command_line"]

    # Pasting the printed command runs the very same options (an ensemble's: each member's step;
    # `cnnkit ensemble` then only averages them).
    captured.clear()
    steps = plan["command_line"].split(" && ")
    if plan["command"] == "ensemble":
        weights = f" --weights {','.join(f'{w:g}' for w in plan['weights'])}" if plan["weights"] else ""
        assert steps[-1] == (f"cnnkit ensemble {' '.join(f'RUN-{i}' for i in range(len(plan['members'])))}{weights}"
                             " --out RUN")
        steps = [step.removesuffix(f" --out RUN-{i}") for i, step in enumerate(steps[:-1])]
    for i, step in enumerate(steps):
        pasted = runner.invoke(app, [*shlex.split(step)[1:], "--out", str(tmp_path / f"pasted-{i}")])
        assert pasted.exit_code == 0, pasted.output
    assert [(command, _plain(options)) for command, options in captured] == _steps(plan)


@pytest.mark.parametrize("command, options", [
    ("extract", ExtractOptions(layers="conv3,conv4", head="svm", head_param=3.0, pca=64, whiten=True, l2_normalize=True,
                               pool="max", flip=True, use_cache=False, cv=3, val_split=0.0, image_size=96,
                               exclude="issues.csv")),
    ("finetune", preset("finetune", freeze="conv2", optimizer="adamw", schedule="cosine", warmup=1, augment="strong",
                        finetune_lr_scale=0.3, momentum=0.8, plateau_patience=0, deterministic=True, device="cpu",
                        batchnorm="frozen", time_limit=12.5)),
    ("train", preset("train", backbone="tiny_cnn", weights="imagenet", epochs=3, image_size=28, dropout=0.0,
                     erase=0.25, label_smoothing=0.05, sanity=True, strict=True, time_limit=0.5,
                     exclude="left out.txt")),
])
def test_any_options_survive_a_round_trip_through_their_command_line(command, options, captured, tmp_path):
    line = command_line(command, tmp_path / "data", options)
    result = runner.invoke(app, [*shlex.split(line)[1:], "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    (ran, received), = captured
    assert ran == command and _plain(received) == _plain(options)


# Option fields the CLI does not expose for a command, because the command fixes them.
_FIXED = {"extract": set(), "finetune": {"mode"},
          "train": {"mode", "freeze", "head_epochs", "finetune_lr_scale", "batchnorm"}}
_PARAM_OF = {"layers": "layer", "l2_normalize": "l2", "use_cache": "no_cache"}


@pytest.mark.parametrize("command, defaults", [("extract", ExtractOptions()), ("finetune", FINETUNE),
                                               ("train", TRAIN)])
def test_cli_defaults_are_the_library_presets(command, defaults):
    import typer.main

    params = {p.name: p for p in typer.main.get_command(app).commands[command].params}
    for f in fields(defaults):
        if f.name in _FIXED[command]:
            continue
        param = params[_PARAM_OF.get(f.name, f.name)]
        expected = getattr(defaults, f.name)
        if f.name == "use_cache":
            expected = not expected
        default = param.default.value if isinstance(param.default, Enum) else param.default
        assert default == (expected.value if isinstance(expected, Enum) else expected), f.name


@pytest.mark.parametrize("command, choices", [
    ("extract", {"--backbone": "Backbone", "--head": "Head", "--pool": "Pool", "--engine": "Engine"}),
    ("finetune", {"--backbone": "Backbone", "--freeze": "Freeze", "--optimizer": "Optimizer",
                  "--schedule": "Schedule", "--augment": "Augment", "--device": "Device", "--batchnorm": "BatchNorm"}),
    ("train", {"--backbone": "Backbone", "--optimizer": "Optimizer", "--schedule": "Schedule",
               "--augment": "Augment", "--device": "Device"}),
    ("advise", {"--backbone": "Backbone", "--engine": "Engine"}),
    ("auto", {"--backbone": "Backbone"}),
    ("predict", {"--backbone": "Backbone", "--engine": "Engine"}),
    ("evaluate", {"--split": "Split", "--engine": "Engine"}),
    ("similar", {"--engine": "Engine"}),
    ("export", {"--format": "ExportFormat", "--quantize": "Quantize"}),
])
def test_help_lists_the_values_of_every_fixed_choice_option(command, choices):
    import cnnkit.cli._common
    import cnnkit.cli.evaluate
    import cnnkit.options

    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"}, terminal_width=400)
    assert result.exit_code == 0
    for flag, enum_name in choices.items():
        enum = next(getattr(m, enum_name) for m in (cnnkit.options, cnnkit.cli._common, cnnkit.cli.evaluate)
                    if hasattr(m, enum_name))
        line = next(line for line in result.stdout.splitlines() if line.lstrip("│ *").startswith(flag + " "))
        for member in enum:
            assert member.value in line, (flag, member.value, line)


def test_train_options_fields_all_have_a_flag_on_finetune():
    """Every field a plan may set is expressible on the command line (finetune exposes them all)."""
    import typer.main

    params = {p.name for p in typer.main.get_command(app).commands["finetune"].params}
    assert {f.name for f in fields(TrainOptions)} - {"mode"} <= params


@pytest.mark.parametrize("strategy", [Strategy.linear_top, Strategy.train_scratch])
def test_auto_exclude_leaves_the_files_out_and_its_plan_records_the_flag(strategy, tmp_path, monkeypatch):
    import cnnkit.advise
    import cnnkit.plan

    data = make_class_tree(tmp_path / "data", {"x": 6, "y": 6}, size=40)
    monkeypatch.setattr(cnnkit.advise, "similarity_signals",
                        lambda spec, images: ({"mean": 0.5}, {"top1": 0.5, "entropy": 0.5}))
    monkeypatch.setattr(cnnkit.advise, "decide", lambda *args: (CELLS[strategy], strategy, ["forced"]))
    listed = tmp_path / "list.txt"
    listed.write_text(f"{data / 'x' / '000.png'}\n")
    ran_plans = []

    def run(plan, out, force=False, dataset=None, **kwargs):
        ran_plans.append((plan, dataset))
        return SimpleNamespace(run_path=Path("RUN"), metrics={}, tried=[])

    monkeypatch.setattr(cnnkit.plan.Plan, "run", run)
    ran = runner.invoke(app, ["auto", str(data), "--out", str(tmp_path / "run"), "--exclude", str(listed)])
    assert ran.exit_code == 0, ran.output
    assert "left out 1 file(s) listed in list.txt" in ran.output
    (plan, dataset), = ran_plans
    assert dataset.excluded == [data / "x" / "000.png"] and len(dataset.samples) == 11
    steps = plan.members or [plan]
    assert all(step.options.exclude == str(listed) for step in steps)
    assert plan.command_line.count(f"--exclude {listed}") == len(steps)
