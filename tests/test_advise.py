"""Choosing the table's cell: the decision on measurements, and advise/auto end to end."""

import json

import pytest

from cnnkit.advise import Thresholds, decide
from cnnkit.auto import run_auto
from cnnkit.predict import predict_run
from cnnkit.kinds.ensemble import members as ensemble_members
from cnnkit.runs import load_run
from conftest import PHOTOS, make_class_tree

SIMILAR = {"shift": {"mean": 0.3}, "imagenet_classifier": {"top1": 0.7}}
DIFFERENT = {"shift": {"mean": 3.0}, "imagenet_classifier": {"top1": 0.1}}
TOP_WINS = {"conv3": {"100%": 0.6}, "conv4": {"100%": 0.7}, "top": {"100%": 0.8}}
MIDDLE_WINS = {"conv3": {"100%": 0.6}, "conv4": {"100%": 0.8}, "top": {"100%": 0.7}}


@pytest.mark.parametrize("median, side, similarity, probes, cell, strategy", [
    (10, 224, SIMILAR, TOP_WINS, {"data": "little", "domain": "similar"}, "linear-top"),
    (10, 28, DIFFERENT, MIDDLE_WINS, {"data": "little", "domain": "different"}, "linear-stages"),
    (1000, 224, SIMILAR, TOP_WINS, {"data": "lot", "domain": "similar"}, "finetune-few"),
    (1000, 224, DIFFERENT, MIDDLE_WINS, {"data": "lot", "domain": "different"}, "finetune-many"),
    (6000, 28, DIFFERENT, MIDDLE_WINS, {"data": "lot", "domain": "different"}, "train-scratch"),
])
def test_every_cell_is_reachable(median, side, similarity, probes, cell, strategy):
    got_cell, got_strategy, reasons = decide(median, side, similarity, probes, Thresholds())
    assert (got_cell, got_strategy) == (cell, strategy)
    # One reason per signal, each saying which way it points.
    assert reasons[0].startswith(f"{median} images per class") and f": {cell['data']} data" in reasons[0]
    assert any("shift" in r for r in reasons) and any("ImageNet classifier" in r for r in reasons)
    assert any("linear probe" in r for r in reasons)


def test_two_of_three_signals_decide_the_domain():
    mixed = {"shift": {"mean": 3.0}, "imagenet_classifier": {"top1": 0.7}}
    assert decide(10, 224, mixed, TOP_WINS, Thresholds())[0]["domain"] == "similar"
    assert decide(10, 224, mixed, MIDDLE_WINS, Thresholds())[0]["domain"] == "different"


def test_thresholds_can_be_overridden():
    assert decide(100, 224, SIMILAR, TOP_WINS, Thresholds(little_data=50))[0]["data"] == "lot"
    assert decide(100, 224, SIMILAR, TOP_WINS, Thresholds(shift=0.1, confidence=0.9))[0]["domain"] == "different"


def test_advise_json_from_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from cnnkit.cli import app

    data = make_class_tree(tmp_path / "data", {"x": 6, "y": 6}, size=40)
    result = CliRunner().invoke(app, ["advise", str(data), "--per-class", "6", "--json"])
    assert result.exit_code == 0, result.output
    advice = json.loads(result.stdout)
    assert advice["cell"]["data"] == "little" and advice["images_per_class"]["median"] == 6
    assert advice["strategy"] in ("linear-top", "linear-stages")
    plan = advice["plan"]
    # Little data: one logistic head on fixed stages (no noisy CV choice among stage sets), flip-averaged,
    # and, with the budget's room, the same head on EfficientNet-Lite1's and Lite2's features, averaged with it.
    assert plan["command"] == "ensemble"
    first, *partners = plan["members"]
    for member in (first, *partners):
        assert member["command"] == "extract" and member["options"]["head"] == "logreg"
        assert member["options"]["val_split"] == 0 and member["options"]["head_param"] == 0.1
        assert member["options"]["layers"] == {"linear-top": "top", "linear-stages": "conv4,top"}[advice["strategy"]]
    assert first["options"]["backbone"] == "efficientnet_lite0"
    # Lite1 only for a domain unlike ImageNet's (it lost 2 points on every linear-top photo cell).
    assert [p["options"]["backbone"] for p in partners] == {
        "linear-top": ["efficientnet_lite2"], "linear-stages": ["efficientnet_lite1", "efficientnet_lite2"]}[advice["strategy"]]
    assert first["options"]["flip"] is (advice["strategy"] == "linear-stages")
    # conv4 over 3 x 3 regions where the plan uses it (top is pooled whole either way), in every member.
    assert {m["options"]["grid"] for m in plan["members"]} == {3 if advice["strategy"] == "linear-stages" else 1}
    for partner in partners:
        assert partner["options"]["flip"] is False
        assert partner["options"]["image_size"] == 224  # Lite0's: an ensemble exports when its members share a size
    assert advice["command"] == plan["command_line"] and plan["command_line"].startswith(f"cnnkit extract {data}")
    runs = " ".join(f"RUN-{i}" for i in range(len(plan["members"])))
    assert plan["command_line"].endswith(f"cnnkit ensemble {runs} --out RUN")
    assert set(advice["similarity"]) >= {"shift", "imagenet_classifier", "probes"}


def test_auto_runs_the_choice_and_the_run_works_everywhere(tmp_path):
    data = make_class_tree(tmp_path / "data", {"x": 6, "y": 6}, size=40)
    result = run_auto(data, tmp_path / "run", budget_minutes=5)
    members = {"linear-top": 2, "linear-stages": 3}[str(result.advice.strategy)]
    assert result.plan.command == "ensemble" and [m.options.head for m in result.plan.members] == ["logreg"] * members
    assert all(result.metrics[f"member{i}_cv_accuracy"] is not None for i in range(members))
    report = result.report_path.read_text()
    assert "## Measured" in report and "## Chosen" in report and str(result.advice.strategy) in report
    assert result.plan.command_line in report
    run = load_run(result.run_path)  # report.md and auto.json are part of the sealed run
    assert {"report.md", "auto.json"} <= set(run.manifest.files)
    assert run.manifest.strategy == str(result.advice.strategy) and run.manifest.command_line == result.plan.command_line
    assert run.model.kind == "ensemble" and len(run.model.members) == members
    # Its members learned from the same files, so the ensemble records them (export's check finds them).
    assert run.manifest.data is not None and run.manifest.data == load_run(run.path / "members" / "0").manifest.data
    assert len(predict_run([data], result.run_path).predictions) == 12


@pytest.mark.slow
def test_crops_of_real_photos_are_a_similar_domain(tmp_path):
    """Natural photos: crops of the sample photos, one class per photo."""
    from PIL import Image

    from cnnkit.advise import advise

    for photo in ("cat.png", "coffee.png", "rocket.jpg", "motorcycle.png", "astronaut.png"):
        image = Image.open(PHOTOS / photo).convert("RGB")
        folder = tmp_path / "photos" / photo.split(".")[0]
        folder.mkdir(parents=True)
        w, h = image.size
        for i in range(6):
            side = int(min(w, h) * (0.6 + 0.05 * i))
            left, top = (w - side) * i // 6, (h - side) * (5 - i) // 6
            image.crop((left, top, left + side, top + side)).save(folder / f"{i}.png")
    advice = advise(tmp_path / "photos", per_class=6)
    assert advice.cell["domain"] == "similar", advice.reasons


def test_auto_fine_tunes_when_the_thresholds_say_lot(tmp_path, monkeypatch):
    import cnnkit.advise

    data = make_class_tree(tmp_path / "data", {"x": 6, "y": 6}, size=40)
    # 12 images are too few to time; a fast machine's speed leaves room for fine-tuning in the minute.
    monkeypatch.setattr(cnnkit.advise, "cached_sample_rate", lambda *args: 300.0)
    result = run_auto(data, tmp_path / "run", budget_minutes=1, thresholds=Thresholds(little_data=2))
    assert result.advice.cell["data"] == "lot"
    assert result.plan.command == "finetune" and result.plan.options.freeze in ("conv2", "conv4")
    assert result.plan.options.epochs >= 1
    # Training is given what is left of the minute, less a reserve for evaluating and saving.
    assert 0.1 <= result.plan.options.time_limit < 1 and "--time-limit" in result.plan.command_line
    # Training stops on time: every epoch but the last began within the limit (load-proof: the epochs'
    # own measured seconds, however slow the machine was).
    history = (result.run_path / "history.csv").read_text().splitlines()
    column = history[0].split(",").index("seconds")
    epochs = [float(row.split(",")[column]) for row in history[1:]]
    assert epochs and sum(epochs[:-1]) <= result.plan.options.time_limit * 60, epochs
    assert load_run(result.run_path).manifest.command_line == result.plan.command_line
    assert (result.run_path / "model.keras").exists() and (result.run_path / "report.md").exists()
    assert len(predict_run([data], result.run_path).predictions) == 12


def test_a_from_scratch_plan_trains_until_its_time_limit():
    from cnnkit.advise import SCRATCH_MAX_EPOCHS, make_plan
    from cnnkit.options import Strategy

    plan = make_plan(Strategy.train_scratch, "data", "efficientnet_lite2", 28, 60_000, 3600, 100.0)
    assert plan.command == "train" and plan.options.epochs == SCRATCH_MAX_EPOCHS
    assert 50 < plan.options.time_limit < 60
    # The cosine schedule fitted to the time limit is the schedule: no plateau cuts, no early stop.
    assert plan.options.plateau_patience == 0 and plan.options.patience >= plan.options.epochs
    assert "--plateau-patience 0" in plan.command_line


def test_little_data_adds_a_second_backbone_only_when_the_budget_has_room():
    from cnnkit.advise import make_plan
    from cnnkit.options import Strategy

    def plan(backbone="efficientnet_lite0", minutes=10.0, rate=50.0):
        return make_plan(Strategy.linear_stages, "data", backbone, None, 1_000, minutes * 60, rate)

    # 1,000 images, and 300 of them in the views --tta is chosen by (5 zoomed for the flipped Lite0, 11
    # zoomed and mirrored for the others): Lite0 (1,000 + 1,500) x 2 passes, Lite1 (1,000 + 3,300) x 1.5,
    # Lite2 (1,000 + 3,300) x 2 at 50/s: 100 + 129 + 172 s of the 544 that 10 minutes leave for training.
    roomy = plan()
    assert roomy.command == "ensemble"
    assert [m.options.backbone for m in roomy.members] == ["efficientnet_lite0", "efficientnet_lite1",
                                                            "efficientnet_lite2"]
    assert [m.options.head_param for m in roomy.members] == [0.1, 0.1, 0.1]  # no noisy CV choice of C
    # 5 minutes leave 262 s for training: room for Lite0's 100 s and Lite1's 129 s, not Lite2's 172 more.
    assert [m.options.backbone for m in plan(minutes=5.0).members] == ["efficientnet_lite0", "efficientnet_lite1"]
    assert plan(minutes=3.0).command == "extract"  # 229 s do not fit in the 149 of three minutes
    assert plan(rate=5.0).command == "extract"
    assert plan(backbone="efficientnet_lite2").command == "extract"  # no partner for other backbones
    similar = make_plan(Strategy.linear_top, "data", "efficientnet_lite0", None, 1_000, 600, 50.0)
    assert [m.options.backbone for m in similar.members] == ["efficientnet_lite0", "efficientnet_lite2"]


def test_a_scratch_plan_adds_a_features_partner_when_the_budget_has_room_for_it():
    from cnnkit.advise import SCRATCH_PARTNER, SCRATCH_WEIGHTS, make_plan, scratch_partner_seconds
    from cnnkit.options import Strategy

    def plan(minutes, rate=150.0, train=54_000, test=10_000):
        return make_plan(Strategy.train_scratch, "data", "efficientnet_lite0", 28, train, minutes * 60, rate,
                         test_images=test)

    # An hour at 150 forward passes/s (x1.6 at 128 px): 74,000 passes, ~5 minutes with the head.
    roomy = plan(60)
    assert roomy.command == "ensemble" and roomy.weights == SCRATCH_WEIGHTS
    network, features = roomy.members
    assert (network.command, features.command) == ("train", "extract")
    assert features.options.image_size == SCRATCH_PARTNER["image_size"] and features.options.grid == 3
    assert features.options.layers == "conv4,top" and features.options.head_param == 0.1
    # The network trains for what the partner leaves of the training time.
    alone = make_plan(Strategy.train_scratch, "data", "efficientnet_lite2", 28, 54_000, 3600, 150.0)
    partner_minutes = scratch_partner_seconds(54_000, 10_000, 150.0) / 60
    assert 3 < partner_minutes < 8
    assert network.options.time_limit == pytest.approx(alone.options.time_limit - partner_minutes, abs=0.02)
    assert f"--weights {SCRATCH_WEIGHTS[0]:g},{SCRATCH_WEIGHTS[1]:g}" in roomy.command_line
    # Ten minutes: the partner would take half of them; the network trains alone.
    assert plan(10).command == "train"
    assert plan(60, rate=None).command == "train"  # unmeasured speed: 30/s assumed, too slow


def test_a_scratch_plan_trains_for_its_budget_not_a_fixed_epoch_count():
    from cnnkit.advise import SCRATCH_MAX_EPOCHS, make_plan
    from cnnkit.options import Strategy

    for minutes in (10, 60):
        plan = make_plan(Strategy.train_scratch, "data", "efficientnet_lite0", 28, 54_000, minutes * 60 - 15, None)
        assert plan.command == "train" and plan.options.epochs == SCRATCH_MAX_EPOCHS
        # Most of the budget trains; a few percent are kept for the final evaluation and saving.
        assert 0.85 * minutes < plan.options.time_limit < minutes


def test_the_input_size_is_the_fastest_within_the_stated_margin():
    from cnnkit.advise import IMAGE_SIZE_MARGIN, SMALL_IMAGE_SIZES, choose_image_size
    from cnnkit.options import Strategy

    # From scratch: the images' own side.
    assert choose_image_size(Strategy.train_scratch, 28, 224)[0] == 28
    # Photos at or above the backbone's input: its own size.
    assert choose_image_size(Strategy.linear_top, 480, 224)[0] == 224
    # Small images: the measured table decides; every faster size is more than the margin below the best.
    size, why = choose_image_size(Strategy.linear_stages, 28, 224)
    best = max(accuracy for accuracy, _ in SMALL_IMAGE_SIZES.values())
    assert SMALL_IMAGE_SIZES[size][0] >= best - IMAGE_SIZE_MARGIN
    assert all(SMALL_IMAGE_SIZES[s][0] < best - IMAGE_SIZE_MARGIN
               for s, (_, speed) in SMALL_IMAGE_SIZES.items() if speed > SMALL_IMAGE_SIZES[size][1])
    assert f"input {size} px" in why and "docs/advise.md" in why


def test_fine_tuning_the_budget_cannot_fit_becomes_the_feature_plan_and_says_why(tmp_path):
    from cnnkit.advise import FINETUNE_MIN_EPOCHS, advise, finetune_epochs_that_fit
    from cnnkit.options import Strategy

    # 10,000 images in what 10 minutes leave, at the default speed: not one epoch; at a GPU's: plenty.
    assert finetune_epochs_that_fit(10_000, 585, None) < 1
    assert finetune_epochs_that_fit(10_000, 585, 3_000.0) >= FINETUNE_MIN_EPOCHS
    data = make_class_tree(tmp_path / "data", {"x": 6, "y": 6}, size=40)
    advice = advise(data, thresholds=Thresholds(little_data=2), budget_minutes=0.1)
    assert advice.cell["data"] == "lot"
    assert advice.strategy in (Strategy.linear_top, Strategy.linear_stages)
    assert advice.plan.command in ("extract", "ensemble")
    assert any("features instead" in reason and "--budget" in reason for reason in advice.reasons), advice.reasons


def test_a_scratch_plan_needs_its_epochs_to_fit_or_pretrained_weights_are_used(tmp_path, monkeypatch):
    """Fashion-MNIST at 3,000 per class in 10 minutes: about 6 epochs from scratch fit (0.8965 measured,
    features 0.9265), so advise falls back to the table's other lot-data cell, here features, and says
    what budget would train from scratch; the full set in an hour has room for its epochs."""
    import cnnkit.advise
    from cnnkit.advise import SCRATCH_MIN_EPOCHS, advise, scratch_epochs_that_fit
    from cnnkit.options import Strategy

    assert 5 <= scratch_epochs_that_fit(27_000, 593, 84.0, 28) < SCRATCH_MIN_EPOCHS
    assert scratch_epochs_that_fit(54_000, 3593, 84.0, 28) >= SCRATCH_MIN_EPOCHS
    # Larger images train slower, in proportion to their pixels.
    assert scratch_epochs_that_fit(27_000, 593, 84.0, 56) == pytest.approx(scratch_epochs_that_fit(27_000, 593, 84.0, 28) / 4)
    data = make_class_tree(tmp_path / "data", {"x": 6, "y": 6}, size=28)
    monkeypatch.setattr(cnnkit.advise, "decide", lambda *args: (
        {"data": "lot", "domain": "different"}, Strategy.train_scratch, ["forced"]))
    kept = advise(data, budget_minutes=5)
    assert kept.strategy == Strategy.train_scratch  # 12 images: epochs enough
    monkeypatch.setattr(cnnkit.advise, "SCRATCH_MIN_EPOCHS", 10**9)
    fallen = advise(data, budget_minutes=0.2)
    assert fallen.strategy == Strategy.linear_stages and fallen.plan.command in ("extract", "ensemble")
    assert any("from scratch" in r and "--budget" in r for r in fallen.reasons), fallen.reasons


def test_the_feature_plan_drops_flip_averaging_when_its_passes_do_not_fit():
    from cnnkit.advise import make_plan
    from cnnkit.options import Strategy

    little = make_plan(Strategy.linear_stages, "data", "efficientnet_lite0", None, 1_000, 590, 84.0, test_images=2_000)
    lot = make_plan(Strategy.linear_stages, "data", "efficientnet_lite0", None, 27_000, 590, 84.0, test_images=2_000)
    assert little.members[0].options.flip and lot.command == "extract" and not lot.options.flip


def test_auto_from_scratch_averages_the_network_with_a_features_head(tmp_path, monkeypatch):
    """The whole from-scratch ensemble plan on tiny data: two members, 2:1, scored on the test split by itself."""
    import cnnkit.advise
    from cnnkit.advise import SCRATCH_PARTNER, SCRATCH_WEIGHTS
    from cnnkit.evaluation import evaluate_run
    from cnnkit.options import Strategy

    data = tmp_path / "data"
    make_class_tree(data / "train", {"x": 10, "y": 10}, size=28)
    make_class_tree(data / "test", {"x": 3, "y": 3}, size=28)
    monkeypatch.setattr(cnnkit.advise, "decide", lambda *args: (
        {"data": "lot", "domain": "different"}, Strategy.train_scratch, ["forced"]))
    monkeypatch.setattr(cnnkit.advise, "_training_seconds", lambda seconds_left: 40.0)
    result = run_auto(data, tmp_path / "run", budget_minutes=5)
    assert result.plan.command == "ensemble" and result.plan.weights == SCRATCH_WEIGHTS
    assert any("averaged 2:1" in reason for reason in result.advice.reasons)
    run = load_run(result.run_path)
    assert run.kind == "ensemble" and run.image_size == SCRATCH_PARTNER["image_size"]
    members = [member for member, _ in ensemble_members(run)]
    assert [m.kind for m in members] == ["network", "feature_head"] and members[0].image_size == 28
    assert [round(w, 3) for _, w in ensemble_members(run)] == [0.667, 0.333]
    # The ensemble scored the test split itself (its members share no held-out evidence).
    assert (result.run_path / "heldout" / "test").is_dir()
    assert run.manifest.metrics["test_accuracy"] == pytest.approx(evaluate_run(run, data).accuracy)
    assert run.manifest.command_line == result.plan.command_line
    assert len(predict_run([data / "test"], result.run_path).predictions) == 6
