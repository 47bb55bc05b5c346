"""Tests of fmcache.freezing: the schedule, the adaptive criterion and the freezing trainer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fmcache.augment import AugFamily
from fmcache.builder import SacaConfig
from fmcache.calibrate import PixelSpace
from fmcache.freezing import (
    AdaptiveFreezer,
    CacheRecipe,
    FreezeError,
    FreezeSchedule,
    FreezingTrainer,
    relative_change,
)
from fmcache.policy import CompressionPolicy
from fmcache.zoo import FashionMNIST, small_cnn
from fmcache.zoo.fashion_mnist import MEAN, STD

ORDER = ["block1", "block2", "block3", "pool", "flatten", "fc"]


# ---- schedule ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("epoch", "boundary"), [(0, None), (1, None), (2, "block1"), (3, "block1"), (4, "block2"),
                                                 (99, "block2")])
def test_schedule_boundary_in_force(epoch, boundary):
    assert FreezeSchedule.parse("2:block1, 4:block2").boundary_at(epoch) == boundary


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.integers(0, 50), st.sampled_from(ORDER), max_size=5))
def test_schedule_text_round_trips(points):
    schedule = FreezeSchedule(points)
    assert FreezeSchedule.parse(schedule.to_text()).points == schedule.points


@pytest.mark.parametrize("text", ["2", "x:block1", "2:", "-1:block1", "2:block1,,3"], ids=str)
def test_bad_schedule_text_is_refused(text):
    with pytest.raises(FreezeError):
        FreezeSchedule.parse(text)


@pytest.mark.parametrize(("text", "match"), [("1:block9", "block9"), ("1:block2,2:block1", "deeper"),
                                             ("1:block2,2:block2", "deeper")])
def test_schedule_validation_names_the_problem(text, match):
    with pytest.raises(FreezeError, match=match):
        FreezeSchedule.parse(text).validate(ORDER)


# ---- adaptive criterion ---------------------------------------------------------------------

def test_relative_change_values():
    a = [torch.ones(4), torch.zeros(2)]
    b = [torch.full((4,), 1.5), torch.zeros(2)]
    assert relative_change(a, b) == pytest.approx(0.5)
    assert relative_change([torch.zeros(3)], [torch.ones(3)]) == 0.0


def _three_blocks() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))


def _epoch(freezer: AdaptiveFreezer, model: nn.Module, epoch: int, steps: list[float]) -> str | None:
    freezer.start_epoch(model)
    with torch.no_grad():
        for block, step in zip(model, steps):
            for p in block.parameters():
                p.mul_(1 + step)
    return freezer.end_epoch(model, epoch)


def test_freezes_the_next_block_once_its_change_has_flattened_and_never_skips():
    torch.manual_seed(0)
    model = _three_blocks()
    freezer = AdaptiveFreezer(["0", "1", "2"], threshold=0.3, flat_tol=0.05, min_epoch=1, max_boundary="1")
    assert _epoch(freezer, model, 0, [0.10, 0.01, 0.10]) is None  # one point: not flat yet
    # block 1 is flat already, but block 0 must go first
    assert _epoch(freezer, model, 1, [0.08, 0.01, 0.10]) is None
    assert _epoch(freezer, model, 2, [0.02, 0.01, 0.10]) == "0"  # 0.02 < 0.3 * 0.10
    assert _epoch(freezer, model, 3, [0.0, 0.01, 0.10]) == "1"  # change 0 % since the last epoch
    assert _epoch(freezer, model, 4, [0.0, 0.0, 0.0]) is None  # max_boundary reached
    assert freezer.history["0"] == pytest.approx([0.10, 0.08, 0.02, 0.0, 0.0], abs=1e-6)


def test_a_block_without_parameters_is_frozen_with_the_next_one():
    """A pooling / reshape child's signal is 0 for good: freezing stopped at it silently."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.Linear(2, 2))
    freezer = AdaptiveFreezer(["0", "1", "2", "3"], threshold=0.3, min_epoch=1, max_boundary="2")
    steps = {0: [0.10, 0, 0.10, 0.1], 1: [0.02, 0, 0.10, 0.1], 2: [0.0, 0, 0.02, 0.1]}
    got = [_epoch(freezer, model, e, s) for e, s in steps.items()]
    assert got == [None, "0", "2"]  # block "1" (no parameters) went with block "2"


def test_grad_norm_metric_reads_recorded_gradients():
    model = _three_blocks()
    freezer = AdaptiveFreezer(["0", "1", "2"], metric="grad_norm", threshold=0.5, min_epoch=0)
    for epoch, scale in enumerate((1.0, 0.2)):
        freezer.start_epoch(model)
        for p in model.parameters():
            p.grad = torch.full_like(p, scale)
        freezer.record_grad(model)
        result = freezer.end_epoch(model, epoch)
    assert result == "0"
    assert freezer.history["0"][1] == pytest.approx(0.2 * freezer.history["0"][0])


def test_bad_metric_is_refused():
    with pytest.raises(FreezeError):
        AdaptiveFreezer(["0"], metric="loss")


# ---- trainer --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data():
    return FashionMNIST("train", limit=96, augment=True, seed=0), FashionMNIST("train", limit=96)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("kind,augment", [("classic", "none"), ("plain", "feature"), ("saca", "saca")])
def test_frozen_prefix_stays_fixed_and_old_caches_are_deleted(tmp_path, data, kind, augment):
    torch.manual_seed(0)
    model = small_cnn(in_channels=1, width=4)
    recipe = CacheRecipe(kind=kind, augment=augment, codec="raw", policy=CompressionPolicy.constant("raw"),
                         saca=SacaConfig(family=AugFamily(photometric=False), n_samples=16),
                         pixels=PixelSpace(MEAN, STD, (0.0, 1.0)), build_batch_size=32)
    trainer = FreezingTrainer(model, *data, epochs=3, work_dir=tmp_path, recipe=recipe,
                              schedule=FreezeSchedule.parse("1:block1,2:block2"), batch_size=32)
    seen: list[tuple[str | None, dict[str, torch.Tensor]]] = []
    original = trainer.freeze_to

    def spy(boundary: str) -> None:
        original(boundary)
        seen.append((boundary, _snapshot(trainer.prefix)))

    trainer.freeze_to = spy  # type: ignore[method-assign]
    out = trainer.fit()
    assert [h["boundary"] for h in out["history"]] == [None, "block1", "block2"]
    for boundary, snap in seen:  # nothing frozen moved afterwards (weights nor BN statistics)
        now = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in {k2.split(".")[0] for k2 in snap}}
        for key, value in snap.items():
            assert torch.equal(now[key], value), (boundary, key)
    if kind == "classic":
        assert out["builds"] == [] and not list(Path(tmp_path).iterdir())
    else:
        assert [b["boundary"] for b in out["builds"]] == ["block1", "block2"]
        assert not Path(out["builds"][0]["path"]).exists()  # the previous cache is gone
        held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                if os.path.islink(f"/proc/self/fd/{fd}")]
        assert not [h for h in held if "cache-block1" in h]  # and its disk space with it (no open handle)
        assert Path(out["builds"][1]["path"]).exists()
        trainer.close()
        assert not Path(out["builds"][1]["path"]).exists()
    assert 0.0 <= trainer.evaluate(FashionMNIST("test", limit=64)) <= 1.0


def test_training_with_dataloader_workers_matches_training_without(tmp_path, data):
    """Reading in worker processes, or on a thread ahead of the steps (the cached maps,
    their SACA draws, the batch order) changes nothing the model sees: the same weights
    after a frozen stage every way."""
    states, cpu = [], []
    for workers, ahead in ((0, 0), (2, 0), (0, 2)):
        torch.manual_seed(0)
        model = small_cnn(in_channels=1, width=4)
        recipe = CacheRecipe(kind="saca", augment="saca", policy=CompressionPolicy.constant("int8"),
                             saca=SacaConfig(family=AugFamily(photometric=False), n_samples=16, max_variants=2),
                             pixels=PixelSpace(MEAN, STD, (0.0, 1.0)), build_batch_size=32)
        trainer = FreezingTrainer(model, *data, epochs=3, work_dir=tmp_path / f"w{workers}a{ahead}", recipe=recipe,
                                  schedule=FreezeSchedule.parse("1:block1"), batch_size=32, num_workers=workers,
                                  read_ahead=ahead)
        out = trainer.fit()
        trainer.close()
        states.append(_snapshot(model))
        cpu.append(out["cpu_s"])
    for other in states[1:]:
        assert states[0].keys() == other.keys()
        for key in states[0]:
            assert torch.equal(states[0][key], other[key]), key
    assert all(c > 0 for c in cpu)


def test_trainer_refuses_up_front_what_would_fail_at_a_freeze_point(tmp_path, data):
    """An unknown freezer block (KeyError at epoch 0), a freeze that leaves no parameter to
    train (torch's error after the cache was built), mask labels with a spatially augmenting
    recipe (refused by the Dataset after training up to the freeze)."""
    model = small_cnn(in_channels=1, width=2)
    last = [n for n, _ in model.named_children()][-1]
    cases = [({"freezer": AdaptiveFreezer(["block1", "blockX"])}, "not top-level children"),
             ({"schedule": FreezeSchedule.parse(f"1:block1,2:{last}")}, "leaves no parameter to train"),
             ({"freezer": AdaptiveFreezer([n for n, _ in model.named_children()])}, "leaves no parameter to train")]
    for kwargs, message in cases:
        with pytest.raises(FreezeError, match=message):
            FreezingTrainer(model, *data, epochs=3, work_dir=tmp_path, **kwargs)

    class Masks(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return data[0][i][0], torch.zeros(32, 32, dtype=torch.long)

    rows = torch.utils.data.TensorDataset(torch.randn(8, 6), torch.zeros(8, dtype=torch.long))
    mlp = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2))
    with pytest.raises(FreezeError, match=r"calibrates on image inputs \(C, H, W\); these are \(6,\)"):
        FreezingTrainer(mlp, rows, rows, epochs=3, work_dir=tmp_path, schedule=FreezeSchedule.parse("1:0"),
                        recipe=CacheRecipe(kind="tiers", augment="feature"))
    with pytest.raises(FreezeError, match="masks"):
        FreezingTrainer(model, Masks(), Masks(), epochs=3, work_dir=tmp_path, schedule=FreezeSchedule.parse("1:block1"),
                        recipe=CacheRecipe(kind="plain", augment="feature", codec="raw"))
    assert not list(Path(tmp_path).iterdir())


def test_trainer_refuses_up_front_what_a_new_users_sweep_found_only_after_training(tmp_path, data):
    """Each of these trained its epochs and failed (or did nothing) at the freeze point (a
    helper's sweep): a schedule point past the last epoch (never froze, silently), an
    HDF5 recipe whose policy names a codec HDF5 cannot store, a SACA recipe at a boundary
    that gives one vector per sample (calibration's scores there are meaningless), and,
    at construction of the recipe itself, an unknown backend."""
    model = small_cnn(in_channels=1, width=2)
    order = [n for n, _ in model.named_children()]
    with pytest.raises(FreezeError, match="schedule epoch 5 is past the last epoch"):
        FreezingTrainer(model, *data, epochs=3, work_dir=tmp_path, schedule=FreezeSchedule.parse("5:block1"))
    nopred = CompressionPolicy.constant("sz3:rel=0.05,algo=nopred", "int8")
    with pytest.raises(FreezeError, match=r"would store 'sz3:rel=0.05,algo=nopred' in hdf5"):
        FreezingTrainer(model, *data, epochs=3, work_dir=tmp_path, schedule=FreezeSchedule.parse("1:block2"),
                        recipe=CacheRecipe(backend="hdf5", policy=nopred))
    assert "flatten" in order  # (N, C) per sample after it
    with pytest.raises(FreezeError, match="one vector per sample"):
        FreezingTrainer(model, *data, epochs=3, work_dir=tmp_path, schedule=FreezeSchedule.parse("1:flatten"))
    with pytest.raises(FreezeError, match="backend 'h5' is not one of hdf5, lmdb"):
        CacheRecipe(backend="h5")
    assert not list(Path(tmp_path).iterdir())


def test_evaluate_counts_pixels_for_mask_labels():
    """Segmentation masks: correct pixels were divided by the number of samples."""
    from fmcache.train import evaluate

    class Perfect(nn.Module):
        def forward(self, x):
            return torch.stack([x[:, 0] <= 0.5, x[:, 0] > 0.5], 1).float()

    x = torch.rand(6, 1, 4, 4)
    y = (x[:, 0] > 0.5).long()
    y[0, 0, 0] = 1 - y[0, 0, 0]  # one wrong pixel of 96
    assert evaluate(Perfect(), torch.utils.data.TensorDataset(x, y)) == pytest.approx(95 / 96)


def test_trainer_refuses_a_schedule_and_a_freezer_together(tmp_path, data):
    with pytest.raises(FreezeError):
        FreezingTrainer(small_cnn(in_channels=1, width=2), *data, epochs=1, work_dir=tmp_path,
                        schedule=FreezeSchedule({}), freezer=AdaptiveFreezer(["block1"]))


class _FlattenInForward(nn.Module):
    """Top-level children that are not the forward: a reshape between them."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 2, 3, stride=4), nn.ReLU())
        self.fc = nn.Linear(2 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.block1(x), 1))


class _SkipInForward(nn.Module):
    """A skip across top-level children: split at block1, the halves drop it."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Conv2d(1, 1, 3, padding=1)
        self.block2 = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Flatten(), nn.Linear(32 * 32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x) + x)


@pytest.mark.parametrize("model", [_FlattenInForward, _SkipInForward])
def test_trainer_refuses_a_model_its_split_would_not_reproduce(tmp_path, data, model):
    """A reshape between children failed mid-training (torch's shape error) after the cache
    was built; a skip across them trained another network, silently."""
    trainer = FreezingTrainer(model(), *data, epochs=2, work_dir=tmp_path, schedule=FreezeSchedule.parse("1:block1"),
                              batch_size=32, recipe=CacheRecipe(kind="plain", augment="none", codec="raw"))
    with pytest.raises(FreezeError, match="not its top-level children applied in order"):
        trainer.fit()
    assert not list(Path(tmp_path).iterdir())  # refused before any cache was built


def test_the_frozen_prefix_stays_in_eval_mode_after_its_build_and_an_evaluation(tmp_path, data):
    """The build's and evaluate's model.train(was) put the frozen BatchNorms back in training
    mode: a forward through trainer.prefix then moved their statistics."""
    torch.manual_seed(0)
    trainer = FreezingTrainer(small_cnn(in_channels=1, width=4), *data, epochs=2, work_dir=tmp_path,
                              schedule=FreezeSchedule.parse("1:block1"), batch_size=32,
                              recipe=CacheRecipe(kind="plain", augment="none", codec="raw"))
    trainer.model.train()
    trainer.freeze_to("block1")
    trainer.evaluate(FashionMNIST("test", limit=32))
    assert trainer.prefix is not None and not any(m.training for m in trainer.prefix.modules())
    assert all(m.training for m in trainer.suffix.modules())
    trainer.close()


def test_recipe_refuses_saca_reading_without_a_saca_cache():
    with pytest.raises(FreezeError, match="saca"):
        CacheRecipe(kind="plain", augment="saca")


# ---- the reproduction's arms -------------------------------------------------------------------

@pytest.mark.parametrize(("arm", "kind", "augment", "codec"), [
    ("classic_freeze", "classic", "none", None), ("cache_fp32_noaug", "plain", "none", "raw"),
    ("cache_fp32_feature", "plain", "feature", "raw"), ("fmcache_no_saca", "tiers", "feature", None),
    ("fmcache", "saca", "saca", None)])
def test_each_arm_maps_to_its_recipe(arm, kind, augment, codec):
    from fmcache.experiment import FAMILY, recipe_for

    recipe = recipe_for(arm, rho=0.125, max_variants=2)
    assert (recipe.kind, recipe.augment) == (kind, augment)
    assert recipe.saca.family == FAMILY and recipe.saca.rho == 0.125 and recipe.saca.max_variants == 2
    if codec:
        assert recipe.codec == codec


def test_full_arm_has_no_recipe_and_unknown_arms_are_refused():
    from fmcache.errors import FmcacheError
    from fmcache.experiment import recipe_for

    assert recipe_for("full") is None
    with pytest.raises(FmcacheError, match="unknown arm"):
        recipe_for("fastest")


@pytest.mark.parametrize("kwargs, error, message", [
    ({"train_samples": 10}, "TrainingError", "10 training samples are fewer than one batch of 128"),
    ({"epochs": 0}, "TrainingError", "epochs=0: train at least one epoch"),
    ({"epochs": 2, "schedule": "5:layer2"}, "FreezeError", "schedule epoch 5 is past the last epoch"),
    # a dict kept the last entry of a repeated epoch: layer2 was dropped silently
    ({"epochs": 3, "schedule": "1:layer2,1:layer3"}, "FreezeError", "epoch 1 appears twice"),
    # checked when the recipe is made, not after an epoch of training
    ({"rho": 1.5}, "BuildError", r"rho=1.5 must be a fraction in \[0, 1\]"),
    ({"max_variants": -1}, "BuildError", "max_variants=-1 must be a whole number >= 1"),
])
def test_run_arm_refuses_settings_that_would_train_nothing_or_never_freeze(tmp_path, kwargs, error, message):
    """`fmcache train --samples 10` trained on no batch (drop_last, batch 128) and reported
    an accuracy; a schedule past the last epoch never froze; --epochs 0 reported the
    untrained model (a new-user sweep). Refused before anything is built."""
    from fmcache import errors
    from fmcache.experiment import run_arm

    with pytest.raises(getattr(errors, error), match=message):
        run_arm("fmcache", work_dir=tmp_path, **{"epochs": 2, "train_samples": 256, **kwargs})
    assert not any(tmp_path.iterdir())


def test_the_reported_peak_counts_the_old_and_new_cache_of_a_swap():
    from fmcache.experiment import _peak_bytes

    assert _peak_bytes([]) == 0 and _peak_bytes([5]) == 5
    assert _peak_bytes([536_725, 219_128]) == 755_853  # both on disk while the second is built
    assert _peak_bytes([10, 1, 1, 10]) == 11


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_train_epoch_trains_inside_a_no_grad_context(context):
    """``train_epoch`` called under ``no_grad`` / ``inference_mode`` (an evaluation helper
    that also trains) failed in ``backward``; it turns grad on itself, same steps as outside."""
    from fmcache.train import StepCounter, train_epoch

    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 1, 4, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(3)]

    def run(inside):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if inside:
            with context():
                stats = train_epoch(model, batches, opt, StepCounter(3, 0.1), bf16=False)
        else:
            stats = train_epoch(model, batches, opt, StepCounter(3, 0.1), bf16=False)
        assert stats["samples"] == 24
        return [p.detach().clone() for p in model.parameters()], stats["loss"]

    torch.manual_seed(0)
    initial = [p.detach().clone() for p in nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).parameters()]
    (outside, loss_out), (inside, loss_in) = run(False), run(True)
    assert loss_in == loss_out
    assert all(torch.equal(a, b) for a, b in zip(outside, inside))
    assert not all(torch.equal(a, b) for a, b in zip(initial, inside))


def test_train_json_prints_only_the_json_on_stdout(tmp_path):
    """`fmcache train --json` printed its per-epoch lines before the JSON on stdout, so
    json.loads of the output failed; they go to stderr with --json."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    fmcache_cli = Path(sys.executable).parent / "fmcache"
    done = subprocess.run([str(fmcache_cli), "train", "--samples", "128", "--epochs", "2", "--test-samples", "200",
                           "--width", "4", "--schedule", "1:layer2", "--work-dir", str(tmp_path), "--json"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["arm"] == "fmcache" and 0 <= result["acc"] <= 1
    assert "froze up to layer2" in done.stderr and "epoch 1:" in done.stderr
    # before the first freeze the log said "frozen to None"
    first = next(line for line in done.stderr.splitlines() if line.startswith("epoch 0:"))
    assert first.endswith("nothing frozen yet)") and "None" not in first
    assert next(line for line in done.stderr.splitlines() if line.startswith("epoch 1:")).endswith("frozen to layer2)")


def test_train_refuses_adaptive_and_a_schedule_together(tmp_path):
    """`fmcache train --adaptive --schedule 1:layer2` ignored the schedule silently."""
    from click.testing import CliRunner

    from fmcache.cli import main

    result = CliRunner().invoke(main, ["train", "--adaptive", "--schedule", "1:layer2", "--work-dir", str(tmp_path)])
    assert result.exit_code == 2 and "give one of them" in result.output
    assert not list(Path(tmp_path).iterdir())
