"""Command line: ``python run.py <command> ...`` (see ``python run.py --help``)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DEFAULT_EXPERIMENT = "pdmer.synthetic.dsaml"


def _print_results(run: Path) -> None:
    md = run / "results.md"
    if md.exists():
        print(md.read_text())
    res = json.loads((run / "results.json").read_text())
    if "gain_ccc_mean" in res:
        print(f"personalization gain (test, mean CCC): {res['gain_ccc_mean']:+.3f}")
    print(f"run folder: {run}")
    for name in ("results.json", "curves.png", "tb", "checkpoints/best.safetensors"):
        if (run / name).exists():
            print(f"  {name}")


def cmd_train(args) -> int:
    from pdmer.config import load_config
    from pdmer.runs import run_dir_for
    from pdmer.train import train

    cfg = load_config(args.experiment, args.overrides)
    run = run_dir_for(cfg)
    if (run / "results.json").exists() and not args.force:
        print(f"{run.name} has already finished with this exact config (use --force to train again):\n")
        _print_results(run)
        return 0
    run = train(cfg)
    print()
    _print_results(run)
    return 0


def cmd_evaluate(args) -> int:
    from pdmer.train import evaluate_run

    run = Path(args.run_dir)
    evaluate_run(run, args.split)
    if args.split == "test":
        _print_results(run)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run.py",
        description="pdmer: personalized dynamic music emotion recognition (DSAML). "
        f"With no command, trains the default experiment ({DEFAULT_EXPERIMENT}) on the embedded benchmark.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train one experiment and evaluate it on test listeners")
    t.add_argument("experiment", nargs="?", default=DEFAULT_EXPERIMENT, help="name in experiments/ (e.g. pdmer.synthetic.dsaml) or a YAML path")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.iterations=50 model.hidden=64")
    t.add_argument("--force", action="store_true", help="train again even if this exact config already finished")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="re-evaluate a finished run's best checkpoint")
    e.add_argument("run_dir", help="runs/<experiment>-<hash>")
    e.add_argument("--split", default="test", choices=("test", "val"))
    e.set_defaults(func=cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv or ["train"])
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.command is None:
        parser.print_help()
        return 2
    from pdmer.checkpoint import CheckpointError
    from pdmer.config import ConfigError
    from pdmer.data.types import DataError

    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
