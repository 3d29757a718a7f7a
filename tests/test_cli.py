"""The command line: help lists the commands, bad input exits 2 with one `error:` line naming it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from pdmer.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "run.py", "--help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    for cmd in ("train", "evaluate"):
        assert cmd in out


def test_unknown_experiment_and_key(capsys):
    assert main(["train", "no.such.experiment"]) == 2
    assert "unknown experiment" in capsys.readouterr().err
    assert main(["train", "pdmer.synthetic.dsaml", "train.iteratons=3"]) == 2
    assert "train.iteratons" in capsys.readouterr().err


def test_evaluate_missing_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_overrides_without_experiment_apply_to_the_default(capsys):
    # `run.py train key=value` means the default experiment with an override, not an experiment named "key=value"
    assert main(["train", "train.iteratons=3"]) == 2
    err = capsys.readouterr().err
    assert "train.iteratons" in err and "unknown experiment" not in err


def test_overrides_may_stand_anywhere_after_the_command():
    from pdmer.cli import parse

    for argv in (
        ["reproduce", "exp", "a.b=1", "c=2", "--resume", "--seeds", "0", "1"],
        ["reproduce", "exp", "--seeds", "0", "1", "--resume", "a.b=1", "c=2"],
        ["reproduce", "exp", "--resume", "a.b=1", "--seeds", "0", "1", "c=2"],
    ):
        args = parse(argv)
        assert (args.experiment, args.overrides, args.seeds, args.resume) == (
            "exp",
            ["a.b=1", "c=2"],
            ["0", "1"],
            True,
        ), argv
    args = parse(["train", "--resume", "meta.inner_lr=0.1"])
    assert (args.experiment, args.overrides) == ("pdmer.synthetic.dsaml", ["meta.inner_lr=0.1"])
    args = parse(["predict", "a=b.wav"])  # not a command with overrides: a song path stays a path
    assert args.songs == ["a=b.wav"]


# --------------------------------------------------------------------------------------------
# Every user mistake: exit code 2 and one `error:` line, no traceback (issue 18, items 7 and 8)
# --------------------------------------------------------------------------------------------


EXAMPLE = REPO / "annotators" / "example" / "ratings.csv"  # rates clip_000 from 15 s to 45 s


def one_error(err: str) -> str:
    """The single `error:` line of a failed command (no traceback), returned for matching."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def wav(path: Path, seconds: float = 2.0) -> Path:
    t = np.arange(int(seconds * 8000)) / 8000
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 8000)
    return path


def _train_args(tmp: Path, *extra: str) -> list[str]:
    return ["train", "pdmer.synthetic.dsaml", f"runtime.out_dir={tmp / 'runs'}", *extra]


BAD_TRAIN = [
    (["runtime.device=tpu"], "not a device"),
    (["model.dropout=2.0"], r"model\.dropout=2\.0 is refused: it must be a finite number >= 0 and < 1"),
    (["meta.inner_lr=-1"], r"meta\.inner_lr=-1\.0 is refused: it must be a finite number > 0"),
    (["meta.inner_lr=nan"], r"meta\.inner_lr=nan is refused"),
    (["runtime.threads=-3"], r"runtime\.threads=-3 is refused: it must be an integer >= 0"),
    (["train.outer_lr=inf"], r"train\.outer_lr=inf is refused"),
]
if not torch.cuda.is_available():
    BAD_TRAIN.append((["runtime.device=cuda"], "this machine has no CUDA device"))
if torch.cuda.device_count() < 8:
    BAD_TRAIN.append((["runtime.device=cuda:7"], "no CUDA device|has [0-7] CUDA device"))


@pytest.mark.parametrize("overrides, expected", BAD_TRAIN, ids=[o[0] for o, _ in BAD_TRAIN])
def test_bad_settings_of_train_are_one_error_line(tmp_path, capsys, overrides, expected):
    assert main(_train_args(tmp_path, *overrides)) == 2
    assert re.search(expected, one_error(capsys.readouterr().err))
    assert not (tmp_path / "runs").exists()  # refused before any run folder exists


def test_malformed_yaml_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  iterations: [1\nmodel: {\n")
    assert main(["train", str(bad)]) == 2
    assert re.search(r"bad\.yaml line \d+, column \d+: not valid YAML", one_error(capsys.readouterr().err))


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["--debug", *_train_args(tmp_path, "model.dropout=2.0")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: model.dropout=2.0")


def test_a_bug_is_a_traceback_and_exit_1(monkeypatch, capsys):
    import pdmer.cli as cli

    def broken(args):
        raise KeyError("oops")

    monkeypatch.setattr(cli, "cmd_tables", broken)
    assert main(["tables"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'oops'" in err
    assert err.rstrip().splitlines()[-1].startswith("error: unexpected KeyError") and "a bug in pdmer" in err


@pytest.fixture
def fake_unfinished_run(tmp_path) -> Path:
    """A run folder with a config and a checkpoint but no results.json: still training (or stopped)."""
    from pdmer.config import config_hash, load_config, to_dict

    cfg = load_config("pdmer.synthetic.dsaml")
    run = tmp_path / "runs" / f"{cfg.name}-{config_hash(cfg)}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    (run / "checkpoints" / "best.safetensors").write_bytes(b"x")
    (run / ".lock").write_text(str(os.getpid()))  # the pid of a live trainer
    return run


def _calibrate(tmp: Path, *extra: str, audio: Path | None = None, ratings: Path = EXAMPLE) -> list[str]:
    audio = audio or wav(tmp / "clip_000.wav")
    return [
        "calibrate",
        "--name",
        "zoe",
        "--audio",
        str(audio),
        "--ratings",
        str(ratings),
        "--annotators",
        str(tmp / "ann"),
        *extra,
    ]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--inner-lr", "-1"], r"--inner-lr \(= meta\.inner_lr\)=-1\.0 is refused: it must be a finite number > 0"),
        (["--inner-lr", "nan"], r"--inner-lr \(= meta\.inner_lr\)=nan is refused"),
        (["--inner-steps", "0"], r"--inner-steps \(= meta\.inner_steps\)=0 is refused: it must be an integer >= 1"),
    ],
)
def test_bad_calibrate_settings_are_one_error_line(tmp_path, capsys, extra, expected):
    assert main(_calibrate(tmp_path, *extra)) == 2
    assert re.search(expected, one_error(capsys.readouterr().err))
    assert not (tmp_path / "ann" / "zoe").exists()


def test_a_run_still_training_is_refused_as_model(tmp_path, capsys, fake_unfinished_run):
    assert main(_calibrate(tmp_path, "--model", str(fake_unfinished_run))) == 2
    line = one_error(capsys.readouterr().err)
    assert "has not finished training (no results.json)" in line and f"being trained by process {os.getpid()}" in line
    assert (
        main(
            [
                "predict",
                str(wav(tmp_path / "song.wav")),
                "--model",
                str(fake_unfinished_run),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "has not finished training" in one_error(capsys.readouterr().err)


def test_bad_audio_paths_say_what_they_are(tmp_path, capsys):
    folder = tmp_path / "songs"
    folder.mkdir()
    assert main(_calibrate(tmp_path, audio=folder)) == 2
    assert "is a folder, not an audio file" in one_error(capsys.readouterr().err)
    empty = tmp_path / "clip_000.wav"
    empty.write_bytes(b"")
    assert main(_calibrate(tmp_path, audio=empty)) == 2
    assert "the file is empty (0 bytes)" in one_error(capsys.readouterr().err)
    assert main(["predict", str(folder), "--out", str(tmp_path / "o")]) == 2
    assert "is a folder, not an audio file" in one_error(capsys.readouterr().err)


def test_out_naming_a_file_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "out.csv"
    out.write_text("")
    assert main(["predict", str(wav(tmp_path / "song.wav")), "--out", str(out)]) == 2
    assert "the output folder (--out) is a file" in one_error(capsys.readouterr().err)


def test_ratings_on_another_scale_get_a_hint(tmp_path, capsys):
    r = tmp_path / "r.csv"
    r.write_text("time_s,valence,arousal\n" + "".join(f"{15 + i / 2:g},{1 + i % 9},{9 - i % 9}\n" for i in range(60)))
    assert main(_calibrate(tmp_path, ratings=r)) == 2
    err = capsys.readouterr().err
    line = one_error(err)
    assert re.search(
        r"values lie outside \[-1, 1\] \(valence 1 to 9, arousal 1 to 9; first on line 2: .*look like a "
        r"1-9 scale: rescale them with x' = \(x - 5\) / 4",
        line,
    ), line
    assert len(err.splitlines()) < 5  # one problem, not one per line of the file


def test_a_huge_ratings_file_is_refused(tmp_path, capsys):
    r = tmp_path / "r.csv"
    with open(r, "w") as f:  # 68 kHz for 30 s would be 60 MB; 9 MB is already too much
        f.write("time_s,valence,arousal\n")
        row = "".join(f"{15 + i / 68000:.6f},0.1,0.2\n" for i in range(68000))
        while f.tell() < 9 * 2**20:
            f.write(row)
    assert main(_calibrate(tmp_path, ratings=r)) == 2
    assert re.search(r"r\.csv: 9\.\d MB of ratings, over the 8 MB", one_error(capsys.readouterr().err))


# --------------------------------------------------------------------------------------------
# A started run is never restarted silently (issue 18, item 2)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rerunning_an_interrupted_run_without_resume_is_refused(tmp_path, capsys, caplog):
    import logging

    from conftest import tiny_overrides

    from pdmer.config import load_config
    from pdmer.runs import STATE_PATH
    from pdmer.training import train

    ov = tiny_overrides(tmp_path, "restart") + ["train.iterations=3", "eval.plot=false", "runtime.threads=1"]
    cfg = load_config("pdmer.synthetic.dsaml", ov)
    caplog.set_level(logging.INFO, logger="pdmer")  # what train.log records

    class Killed(Exception):
        pass

    def kill_at_2(it, summary):
        if it == 2:
            raise Killed

    with pytest.raises(Killed):  # stopped after iteration 2 of 3, as a kill would
        train(cfg, on_validate=kill_at_2)
    from pdmer.runs import run_dir_for

    run = run_dir_for(cfg)
    state = (run / STATE_PATH).read_bytes()
    log = (run / "train.log").read_text()
    assert main(["train", "pdmer.synthetic.dsaml", *ov]) == 2
    line = one_error(capsys.readouterr().err)
    assert str(run) in line and "iteration 2" in line and "--resume" in line and "--force" in line
    assert (run / STATE_PATH).read_bytes() == state and (run / "train.log").read_text() == log  # nothing lost
    assert main(["train", "pdmer.synthetic.dsaml", *ov, "--resume"]) == 0
    assert "resumed" in (run / "train.log").read_text()
    capsys.readouterr()
    assert main(["train", "pdmer.synthetic.dsaml", *ov, "--force"]) == 0  # a finished run trained again, on request
    text = (run / "train.log").read_text()
    assert text.count(f"run {run.name}:") == 1 and "resumed" not in text  # one history in the log
