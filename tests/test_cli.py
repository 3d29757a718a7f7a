"""The command line: help lists the commands, bad input exits 2 with a message naming it."""
import subprocess
import sys
from pathlib import Path

from pdmer.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "run.py", "--help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
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

    for argv in (["reproduce", "exp", "a.b=1", "c=2", "--resume", "--seeds", "0", "1"],
                 ["reproduce", "exp", "--seeds", "0", "1", "--resume", "a.b=1", "c=2"],
                 ["reproduce", "exp", "--resume", "a.b=1", "--seeds", "0", "1", "c=2"]):
        args = parse(argv)
        assert (args.experiment, args.overrides, args.seeds, args.resume) == ("exp", ["a.b=1", "c=2"], ["0", "1"], True), argv
    args = parse(["train", "--resume", "meta.inner_lr=0.1"])
    assert (args.experiment, args.overrides) == ("pdmer.synthetic.dsaml", ["meta.inner_lr=0.1"])
    args = parse(["predict", "a=b.wav"])  # not a command with overrides: a song path stays a path
    assert args.songs == ["a=b.wav"]
