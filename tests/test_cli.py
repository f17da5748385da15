"""The training command-line tools refuse what would fail after the work (training, data preparation) at the
start, naming the setting, flag or file, and what they accept they finish: a run's settings, its run folder and
checkpoint, a stored version's weights. Each test stops before any data are prepared or any model trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from modelcard.card import read_card
from plant.config import ConfigError
from tests.conftest import ROOT
from training import run
from training.config import load_config

SERVED = ROOT / "models" / (ROOT / "models" / "CURRENT").read_text().strip()


def refused(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config("tiny", overrides=overrides)


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``training.run.run`` (data preparation onwards) replaced: the list records each run that got that far."""
    started: list[str] = []

    def stand_in(args: object, cfg: object, version: str, store: Path, run_dir: Path) -> int:
        started.append(version)
        return 0

    monkeypatch.setattr(run, "run", stand_in)
    return started


# 1. A width without a driver


def test_a_card_whose_interval_width_follows_no_variable_is_servable() -> None:
    """train.width_driver=none and catalogs without a disturbance write a null driver and driver name; the graph
    reads none. The card check refused them after the whole run; any other null under calibration still is."""
    from modelcard.validate import card_problems

    card = read_card(SERVED)
    card["calibration"]["width"].update(driver=None, driver_name=None)
    assert card_problems(card) == []
    card["calibration"]["width"]["gamma"] = None
    assert card_problems(card) == ["calibration.width.gamma is None, not a finite number"]


# 2. An objective whose setpoints the model cannot plan


def test_a_model_without_loops_gets_no_setpoint_advice_and_its_card_is_servable() -> None:
    """With model.setpoint_inputs=false the card has no loops, and the catalog's objective decides setpoints:
    it was kept and the card refused after the whole run. Now the card has no optimizer table (POST /optimize
    answers 409, as for any card without one), and says so before training."""
    from modelcard.validate import card_problems
    from plant.catalog import BSM1
    from training.publish import narrowed_objective

    card = read_card(SERVED)
    assert BSM1.optimizer is not None and narrowed_objective(BSM1.optimizer, card["variables"]) is not None
    card["variables"].pop("loops")
    assert narrowed_objective(BSM1.optimizer, card["variables"]) is None
    card.pop("optimizer")
    card["model"]["loop_feedback"] = False
    card["calibration"]["loop_pull"] = None
    assert card_problems(card) == []


def test_the_run_says_before_training_that_a_model_without_setpoints_gives_no_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: list[str]
) -> None:
    argv = ["--preset", "tiny", "--store", str(tmp_path / "s"), "--run-dir", str(tmp_path / "r")]
    assert run.main([*argv, "model.setpoint_inputs=false"]) == 0 and no_work
    assert "POST /optimize answers 409" in capsys.readouterr().err


# 3. No same time yesterday


def test_seasonal_steps_of_zero_gives_yesterday_no_weight() -> None:
    """model.seasonal_steps=0 ("0: none") with the adaptive weight crashed calibration on a slice [-J - 0 : -0]."""
    from training.config import ModelConfig
    from training.model import KoVAE

    model = KoVAE(3, 2, ModelConfig(z_dim=6, h_dim=8, real_modes=2, exogenous_modes=0, seasonal_steps=0))
    assert model.cfg.seasonal_adaptive
    weights = model.seasonal_weights(torch.randn(5, 12, 3), 7)
    assert weights.shape == (5, 7, 3) and not weights.any()


# 4. History and horizon the scoring and the export need


def test_a_history_shorter_than_4_or_a_horizon_of_1_is_refused_naming_why() -> None:
    """Both trained fully, then crashed: the ARX(4) baseline in the scoring, a reshape in the export."""
    refused(["train.history=3"], r"train\.history >= 4.*ARX\(4\)")
    refused(["train.history=2"], r"train\.history >= 4")
    refused(["train.horizon=1", "train.curriculum_start=1"], r"train\.horizon >= 2.*traced at 2 or more steps")
    cfg = load_config("tiny", overrides=["train.history=4", "train.horizon=2", "train.curriculum_start=1"])
    assert (cfg.train.history, cfg.train.horizon) == (4, 2)


# 5, 6 and 7. The run folder's checkpoint


def checkpoint(run_dir: Path, overrides: list[str] | None = None) -> Path:
    """A checkpoint as training writes it, of a tiny run with these overrides (its weights are not read here)."""
    last = run_dir / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    cfg = load_config("tiny", overrides=overrides or [])
    torch.save({"model": {}, "opt": {}, "epoch": 5, "config": cfg.to_dict()}, last)
    return last


def test_resume_compares_every_setting_but_the_free_ones_before_preparing_the_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: list[str]
) -> None:
    """Only the model and seven training settings were compared: other data, loss or optimiser settings trained
    on silently (and the card misstated them), and a refusal came after the data were prepared."""
    run_dir = tmp_path / "r"
    checkpoint(run_dir)
    argv = ["--preset", "tiny", "--store", str(tmp_path / "s"), "--run-dir", str(run_dir), "--resume"]
    changed = ["data.dither_share=0.5", "train.beta=0.5", "train.gap_share=0.1", "train.max_eval_windows=7"]
    assert run.main([*argv, *changed]) == 2
    err = capsys.readouterr().err
    for said in (
        "data.dither_share: 0.3 in the checkpoint, 0.5 now",
        "train.beta: 0.01 in the checkpoint, 0.5 now",
        "train.gap_share: 0.3 in the checkpoint, 0.1 now",
        "train.max_eval_windows: 100 in the checkpoint, 7 now",  # it picks the kept epoch
    ):
        assert said in err
    assert no_work == []
    free = ["train.threads=1", "train.checkpoint_every=2", "train.calibration_samples=40", "train.width_driver=none"]
    assert run.main([*argv, *free, "data.workers=1", f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    assert no_work == ["r"]


def test_a_damaged_or_missing_checkpoint_is_named_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: list[str]
) -> None:
    """A garbage last.pt gave an UnpicklingError traceback; a missing one was found after data preparation."""
    run_dir = tmp_path / "r"
    last = checkpoint(run_dir)
    argv = ["--preset", "tiny", "--store", str(tmp_path / "s"), "--run-dir", str(run_dir), "--resume"]
    last.write_bytes(b"not a checkpoint")
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {last} cannot be read" in err and "Traceback" not in err
    last.unlink()
    assert run.main(argv) == 2
    assert f"no checkpoint at {last}" in capsys.readouterr().err
    assert no_work == []


def test_a_new_run_never_overwrites_a_checkpoint_in_its_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: list[str]
) -> None:
    """The same command without --resume started over and overwrote the interrupted run's progress."""
    run_dir = tmp_path / "r"
    last = checkpoint(run_dir)
    before = last.read_bytes()
    assert run.main(["--preset", "tiny", "--store", str(tmp_path / "s"), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "add --resume to continue that run, or choose another --run-dir" in err and str(last) in err
    assert last.read_bytes() == before and no_work == []


def test_a_run_folder_another_run_is_writing_is_named_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: list[str]
) -> None:
    """The checkpoint was checked before the folder's lock: a second run in a folder another run was writing was
    told to add --resume, which then met the lock."""
    import fcntl

    run_dir = tmp_path / "r"
    checkpoint(run_dir)  # the live run's first checkpoint
    with open(run_dir / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run.main(["--preset", "tiny", "--store", str(tmp_path / "s"), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "another run is writing" in err and "--resume" not in err and no_work == []


def test_resume_compares_a_plants_data_by_content_not_by_where_it_lies() -> None:
    """A run folder copied to another machine, or a catalog path written another way, refused a resume of a
    plant's own data, while an import replaced under the same path passed."""
    from training.loop import TrainingFailed, check_resumed_data, resume_differences

    saved = {"data": {"source": "historian", "cache_dir": "data_cache/imp", "catalog": "plant/x.toml", "seed": 1}}
    moved = {"data": {"source": "historian", "cache_dir": "/mnt/copy/imp", "catalog": "./plant/x.toml", "seed": 1}}
    assert resume_differences(saved, moved) == []
    assert resume_differences(saved, {"data": {**moved["data"], "seed": 2}}) == [
        "data.seed: 1 in the checkpoint, 2 now"
    ]
    check_resumed_data("abc", "abc")
    check_resumed_data(None, "abc")  # a checkpoint from before it kept the data hash
    with pytest.raises(TrainingFailed, match="other data than the run's: data hash abc in the checkpoint, def now"):
        check_resumed_data("abc", "def")


# 8, 9 and 10. Settings refused by validation


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.whatif_factor=[0.1]", r"data\.whatif_factor must be \[lo, hi\], two numbers: \[0\.1\]"),
        ("data.excite_kla5=[]", r"data\.excite_kla5 must be \[lo, hi\], two numbers: \[\]"),
        ("data.excite_minutes=[5]", r"data\.excite_minutes must be \[lo, hi\], two numbers"),
        ("data.whatif_factor=[0.1,0.2,0.3]", r"data\.whatif_factor must be \[lo, hi\], two numbers"),
        ("data.kla_ranges=[[1,2,3],[1,2]]", r"data\.kla_ranges must be two \[lo, hi\] pairs"),
        ("train.seed=-1", r"train\.seed must be in 0\.\.2\*\*32 - 1: -1"),
        (f"train.seed={2**32}", r"train\.seed must be in 0\.\.2\*\*32 - 1"),
        ("data.seed=-1", r"data\.seed must be in 0\.\.2\*\*32 - 1: -1"),
        ("model.decoder_controls=false", r"model\.loop_feedback needs model\.decoder_controls"),
    ],
)
def test_settings_that_failed_after_data_preparation_are_refused_by_name(override: str, named: str) -> None:
    """An IndexError in validation (short pairs), tracebacks after data preparation (seeds), a ValueError in the
    model (a loop's feedback with a decoder that does not read the controls); longer pairs were accepted."""
    with pytest.raises(ConfigError, match=named):
        load_config("tiny", overrides=[override, "model.loop_feedback=true"])


def test_the_widest_valid_settings_still_load() -> None:
    cfg = load_config("tiny", overrides=[f"train.seed={2**32 - 1}", "data.seed=0", "model.decoder_controls=false"])
    assert cfg.train.seed == 2**32 - 1 and not cfg.model.loop_feedback


# 11. Folders under a file


def test_a_store_or_run_dir_under_a_file_is_refused_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: list[str]
) -> None:
    """A parent that is a file passed the check and failed with NotADirectoryError after training and export."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for flag, other in (("--store", "--run-dir"), ("--run-dir", "--store")):
        argv = ["--preset", "tiny", flag, str(a_file / "sub" / "v1"), other, str(tmp_path / "ok")]
        assert run.main(argv) == 2
        assert f"error: {flag} {a_file / 'sub' / 'v1'}: {a_file} is a file, not a folder" in capsys.readouterr().err
    assert no_work == [] and not (tmp_path / "ok").exists()


# 12. A stored version's weights


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the served version in a store of its own: (store, the version's folder)."""
    store = tmp_path / "store"
    shutil.copytree(SERVED, store / SERVED.name)
    return store, store / SERVED.name


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_export_and_recalibrate_name_missing_or_damaged_weights(
    stored: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    """Both ended in a traceback from torch.load."""
    from export.__main__ import main as export_main
    from training.recalibrate import main as recalibrate_main

    store, folder = stored
    weights = folder / "weights.pt"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(b"\x80garbage")
    assert export_main(["--version", SERVED.name, "--store", str(store)]) == 2
    assert f"error: {weights}" in capsys.readouterr().err
    argv = ["--version", SERVED.name, "--as", "w2", "--refit", "width", "--store", str(store)]
    assert recalibrate_main([*argv, "--run-dir", str(tmp_path / "w2")]) == 2
    err = capsys.readouterr().err
    assert f"error: {weights}" in err and "Traceback" not in err


# 13. The smaller ones


def test_a_toml_float_for_a_whole_number_is_refused_as_on_the_command_line(tmp_path: Path) -> None:
    """[train] epochs = 5.7 trained 5 epochs, silently; train.epochs=5.7 on the command line was refused."""
    toml = tmp_path / "c.toml"
    toml.write_text("[train]\nepochs = 5.7\n")
    with pytest.raises(ConfigError, match=r"train\.epochs: expected a whole number, got 5\.7"):
        load_config("tiny", toml)
    refused(["train.epochs=5.7"], r"train\.epochs: expected a number")
    toml.write_text("[train]\nepochs = 5\nlr = 1\n")  # a whole number for a float is a float
    assert load_config("tiny", toml).train.lr == 1.0


def test_no_window_that_fits_names_the_history_and_horizon_settings() -> None:
    from plant.scenarios import DataError, ScenarioData
    from training.data import make_windows

    n = 50
    sd = ScenarioData("s", np.arange(n) * 15.0, np.zeros((n, 2)), np.zeros((n, 1)), np.zeros((n, 0)), 0, "normal", "g")
    with pytest.raises(DataError, match=r"20\+200 steps \(train\.history \+ train\.horizon\).* longest 50 steps"):
        make_windows([sd], 20, 200)


def test_export_table_into_a_folder_is_refused_before_any_simulation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It simulated the scenarios, then failed with IsADirectoryError."""
    from training.data import main

    assert main(["export-table", str(tmp_path)]) == 2
    assert f"error: OUT {tmp_path} is a folder: give the CSV file to write" in capsys.readouterr().err


def test_the_config_still_writes_quantiles_for_the_cards_that_name_them() -> None:
    """train.quantiles is read by nothing (requests name their quantiles), but stored configs carry it."""
    from training.config import config_from_dict

    stored_cfg = json.loads((SERVED / "config.json").read_text())
    assert "quantiles" in stored_cfg["train"]
    assert config_from_dict(stored_cfg).train.quantiles == tuple(stored_cfg["train"]["quantiles"])
