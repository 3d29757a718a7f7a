"""Command line: ``python run.py <command> ...`` (see ``python run.py --help``)."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from pdmer.data.check import FORMATS

DEFAULT_EXPERIMENT = "pdmer.synthetic.dsaml"


def _print_results(run: Path) -> None:
    md = run / "results.md"
    if md.exists():
        print(md.read_text())
    res = json.loads((run / "results.json").read_text())
    if "gain_ccc_mean" in res:
        print(f"personalization gain (test, mean CCC): {res['gain_ccc_mean']:+.3f}")
        g = res.get("gain_per_listener") or {}
        if g:
            print(
                f"  per listener: {g['mean']:+.3f} (95% bootstrap CI {g['ci95'][0]:+.3f} to {g['ci95'][1]:+.3f}), "
                f"{g['listeners_improved']} of {g['listeners']} listeners improved"
            )
    print(f"run folder: {run}")
    for name in ("results.json", "curves.png", "tb", "checkpoints/best.safetensors"):
        if (run / name).exists():
            print(f"  {name}")


def cmd_train(args) -> int:
    from pdmer.config import load_config
    from pdmer.runs import run_dir_for
    from pdmer.training import train

    cfg = load_config(args.experiment, args.overrides)
    run = run_dir_for(cfg)
    if (run / "results.json").exists() and not args.force:
        print(f"{run.name} has already finished with this exact config (use --force to train again):\n")
        _print_results(run)
        return 0
    run = train(cfg, resume=args.resume, force=args.force)
    from pdmer import distributed

    if not distributed.is_main():  # torchrun: rank 0 reports
        return 0
    print()
    _print_results(run)
    return 0


def cmd_reproduce(args) -> int:
    from pdmer.config import ConfigError
    from pdmer.reproduce import SeedFailed, reproduce

    seeds = None
    if args.seeds is not None:  # overrides after the seeds were already taken out by `parse`
        try:
            seeds = [int(a) for a in args.seeds]
        except ValueError:
            raise ConfigError(f"--seeds takes integers, got {args.seeds}") from None
    try:
        out = reproduce(args.experiment, seeds, args.overrides, resume=args.resume, jobs=args.jobs)
    except SeedFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print()
    print((out / "table.md").read_text())
    print(f"reproduction folder: {out}")
    for name in ("table.md", "table.json"):
        print(f"  {name}")
    print("update experiments/README.md: python run.py tables")
    return 0


def cmd_tables(args) -> int:
    from pdmer.reproduce import write_experiments_readme, write_readme_results

    path, n, measured = write_experiments_readme(args.runs)
    print(f"wrote {path}: {n} experiments, {measured} with results")
    if write_readme_results(args.runs):
        print("wrote the results section of README.md")
    return 0


def cmd_evaluate(args) -> int:
    from pdmer.evaluation import evaluate_run

    run = Path(args.run_dir)
    evaluate_run(run, args.split)
    if args.split == "test":
        _print_results(run)
    return 0


def _show(path) -> str:
    from pdmer.personal import _display

    return _display(Path(path))


def cmd_calibrate(args) -> int:
    from pdmer.config import ConfigError, check_setting
    from pdmer.personal import calibrate

    if args.inner_steps is not None:  # named as the user typed them; calibrate() checks them again
        check_setting("meta.inner_steps", args.inner_steps, "--inner-steps")
    if args.inner_lr is not None:
        check_setting("meta.inner_lr", args.inner_lr, "--inner-lr")
    if args.name is None:
        return _calibrate_study(args)
    if not args.audio or args.audio_dir is not None or args.annotator_ids:
        raise ConfigError(
            "calibrate --name NAME takes --audio SONG (one or more) and --ratings RATINGS.csv; --audio-dir and "
            "--annotator are for a study file of many listeners (leave out --name)"
        )
    prof = calibrate(
        args.name,
        args.audio,
        args.ratings,
        args.model,
        annotators_dir=args.annotators,
        keep_history=args.keep_history,
        inner_steps=args.inner_steps,
        inner_lr=args.inner_lr,
    )
    info = prof.info
    base, ad, fit = info["base"], info["adaptation"], info["fit"]["mean"]
    how = "given" if args.model else "the latest trained run; --model RUN_DIR picks another"
    print(f"model: {base['run']} ({how})")
    songs = ", ".join(f"{s['song_id']} ({s['rated_from_s']:.1f}-{s['rated_to_s']:.1f} s)" for s in info["songs"])
    print(
        f"calibrated {prof.name!r} on {len(info['songs'])} song(s): {songs}; {ad['inner_steps']} inner steps at "
        + ("the run's learned rates" if ad.get("inner_lr_learned") else f"lr {ad['inner_lr']:g}")
    )
    g, pz = fit["generic"]["ccc_mean"], fit["personalized"]["ccc_mean"]
    print(f"fit on the support song(s), mean CCC: generic {g:.3f} -> personal {pz:.3f}")
    print(f"wrote {_show(prof.path)}/")
    for f in prof.files:
        print(f"  {f.name}")
    return 0


def _calibrate_study(args) -> int:
    """calibrate without --name: every listener (annotator_id) of a study file, one profile each."""
    from pdmer.config import ConfigError
    from pdmer.personal import calibrate_many

    if args.audio_dir is None or args.audio:
        raise ConfigError(
            "calibrate without --name calibrates every listener of --ratings STUDY.csv: give --audio-dir DIR "
            "(its songs, DIR/<song_id>.wav), not --audio; or give --name NAME --audio SONG for one listener"
        )
    report = calibrate_many(
        args.ratings,
        args.audio_dir,
        args.model,
        annotators_dir=args.annotators,
        keep_history=args.keep_history,
        inner_steps=args.inner_steps,
        inner_lr=args.inner_lr,
        names=args.annotator_ids,
    )
    if report.info:
        how = "given" if args.model else "the latest trained run; --model RUN_DIR picks another"
        print(f"model: {next(iter(report.info.values()))['base']['run']} ({how})")
    print(report.summary())
    return 0 if report.ok else 1  # 1: some listeners skipped (the others are written); the summary says why


def cmd_predict(args) -> int:
    from pdmer.personal import predict

    preds = predict(
        args.songs, args.name, args.model, out_dir=args.out, annotators_dir=args.annotators, plot=not args.no_plot
    )
    if preds:
        how = preds[0].model_how + ("" if args.model else "; --model RUN_DIR picks another")
        print(f"model: {_show(preds[0].model)} ({how})")
    for p in preds:
        kind = f"personal ({args.name}) and generic" if args.name else "generic"
        files = ", ".join(_show(f) for f in (p.csv, p.png) if f is not None)
        print(f"{p.song_id}: {len(p.times)} steps ({len(p.times) * 0.5:.1f} s), {kind} -> {files}")
    return 0


def cmd_rate(args) -> int:
    import webbrowser

    from pdmer.personal import ProfileError
    from pdmer.rate import RateServer, RateSession
    from pdmer.rate.server import can_open_browser

    try:
        session = RateSession(
            args.name,
            args.audio,
            args.predict or (),
            args.model,
            annotators_dir=args.annotators,
            out_dir=args.out,
            keep_history=args.keep_history,
            practice_s=args.practice_s,
        )
    except ProfileError as e:  # a bad name, no usable model
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = RateServer(session, args.host, args.port)
    how = session.base.how + ("" if args.model else "; --model RUN_DIR picks another")
    print(f"model: {_show(session.base.run)} ({how})")
    for warning in (session.warning, server.warning):
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    print(f"rating page for {args.name!r}, {len(session.songs)} song(s): {server.url}", flush=True)
    print(
        "open it in a browser on this machine (the address holds the access token); Ctrl-C stops the server", flush=True
    )
    if not args.no_browser and can_open_browser():
        webbrowser.open(server.url)
    try:
        server.serve()
    except KeyboardInterrupt:  # uvicorn has shut down cleanly and passes the signal on
        pass
    done = session.result
    print(f"stopped; profile: {done['profile']}/" if done else "stopped; nothing was submitted, no profile written")
    return 0


def cmd_data_check(args) -> int:
    from pdmer.config import load_config
    from pdmer.data.check import check_data, format_report

    cfg = load_config(None, args.overrides)
    report = check_data(args.format, args.root, cfg, audio=args.audio, progress=sys.stderr.isatty())
    print(format_report(report, verbose=args.verbose_report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        print(f"report: {args.json}")
    return 0 if report["ok"] else 1


def cmd_sweep(args) -> int:
    import optuna

    from pdmer.sweep import run_sweep

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # pdmer logs each trial itself
    res = run_sweep(
        args.sweep, trials=args.trials, storage=args.storage, study_name=args.study, overrides=args.overrides
    )
    c, best = res.counts, res.summary["best"]
    print(
        f"\nsweep {res.study_name}: {c['complete'] + c['pruned']} of {res.requested} trials finished "
        f"({c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed); this process ran {len(res.ran)}"
    )
    print(f"storage: {res.storage}")
    if best:
        print(
            f"best: trial {best['trial']}, {res.summary['objective']['metric']} = {best['value']:.4f}: "
            + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
        )
    print(f"sweep folder: {res.sweep_dir}")
    for name in (
        "summary.md",
        "summary.json",
        "best.yaml",
        "optimization_history.png",
        "parallel_coordinate.png",
        "intermediate_values.png",
        "param_importances.png",
        "trials",
    ):
        if (res.sweep_dir / name).exists():
            print(f"  {name}")
    if best:
        print(f"train the best configuration: python run.py train {res.sweep_dir / 'best.yaml'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run.py",
        description="pdmer: personalized dynamic music emotion recognition (DSAML). "
        f"With no command, trains the default experiment ({DEFAULT_EXPERIMENT}) on the embedded benchmark.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error too (a mistake in the input otherwise prints one `error:` line)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    _add_training_commands(sub)
    _add_listener_commands(sub)
    _add_rate_command(sub)
    _add_data_command(sub)
    _add_sweep_command(sub)
    return p


OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")  # key.sub=value
TAKES_OVERRIDES = ("train", "reproduce", "sweep", "data")


def _add_training_commands(sub) -> None:
    """Train, reproduce, tables, evaluate: the commands of the benchmark's runs."""
    t = sub.add_parser("train", help="train one experiment and evaluate it on test listeners")
    t.add_argument(
        "experiment",
        nargs="?",
        default=DEFAULT_EXPERIMENT,
        help="name in experiments/ (e.g. pdmer.synthetic.dsaml) or a YAML path",
    )
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.iterations=50 model.hidden=64")
    t.add_argument("--force", action="store_true", help="train again even if this exact config already finished")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its last training state (checkpoints/state/), with the same result",
    )
    t.set_defaults(func=cmd_train)

    r = sub.add_parser(
        "reproduce",
        help="train and evaluate one experiment for each seed; table of mean ± std in runs/reproduce/",
        description="Train and evaluate EXPERIMENT once per training seed (train.seed; data and split fixed), then "
        "write runs/reproduce/<experiment>-<hash>/table.md and table.json with every test metric's mean and standard "
        "deviation. Finished seeds are reused; --resume continues an interrupted seed from its last training state.",
    )
    r.add_argument("experiment", help="name in experiments/ (e.g. pdmer.synthetic.no_local_branch) or a YAML path")
    r.add_argument("overrides", nargs="*", help="dotted overrides for every seed, e.g. train.iterations=100")
    r.add_argument("--seeds", nargs="+", metavar="S", help="training seeds (default: 0 1 2)")
    r.add_argument("--resume", action="store_true", help="continue an interrupted seed from its last training state")
    r.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="train N seeds at once, each in its own process (default 1); give each its share of the "
        "cores with runtime.threads, e.g. --jobs 3 runtime.threads=4 on 12 cores",
    )
    r.set_defaults(func=cmd_reproduce)

    tb = sub.add_parser("tables", help="regenerate experiments/README.md from the reproductions' table.json files")
    tb.add_argument("--runs", metavar="DIR", help="runs folder to read (default: runs/)")
    tb.set_defaults(func=cmd_tables)

    e = sub.add_parser("evaluate", help="re-evaluate a finished run's best checkpoint")
    e.add_argument("run_dir", help="runs/<experiment>-<hash>")
    e.add_argument("--split", default="test", choices=("test", "val"))
    e.set_defaults(func=cmd_evaluate)


def _add_listener_commands(sub) -> None:
    """Calibrate and predict: one listener's profile and its curves."""
    c = sub.add_parser(
        "calibrate", help="adapt the trained model to one listener from their ratings; saves annotators/NAME/"
    )
    c.add_argument(
        "--name",
        help="listener name: letters, digits, - and _; without it, --ratings is a study file of many listeners "
        "(song_id,annotator_id,time_s,valence,arousal) and --audio-dir holds its songs: one profile per annotator_id",
    )
    c.add_argument(
        "--audio",
        action="extend",
        nargs="+",
        metavar="SONG",
        help="a rated audio file (repeat for k-shot: --audio a.wav --audio b.wav); "
        "song id = file name without extension",
    )
    c.add_argument(
        "--ratings",
        required=True,
        metavar="RATINGS.csv",
        help="song_id,annotator_id,time_s,valence,arousal (or time_s,valence,arousal for one song); "
        "any rate, values in [-1, 1]",
    )
    c.add_argument(
        "--audio-dir",
        metavar="DIR",
        help="without --name: the study's rated songs, DIR/<song_id>.<wav|flac|mp3|ogg>",
    )
    c.add_argument(
        "--annotator",
        dest="annotator_ids",
        action="extend",
        nargs="+",
        metavar="ID",
        help="without --name: calibrate only these annotator ids of the study file (default: all)",
    )
    c.add_argument("--model", metavar="RUN_DIR", help="base run (default: the latest finished run in runs/)")
    c.add_argument(
        "--keep-history", action="store_true", help="keep a replaced profile in annotators/.history/NAME/<time>/"
    )
    c.add_argument("--inner-steps", type=int, help="default: the base run's meta.inner_steps")
    c.add_argument("--inner-lr", type=float, help="default: the base run's meta.inner_lr")
    c.add_argument("--annotators", metavar="DIR", help="profiles folder (default: annotators/)")
    c.set_defaults(func=cmd_calibrate)

    pr = sub.add_parser(
        "predict", help="valence/arousal curves (CSV + PNG) of whole songs, generic or for a calibrated listener"
    )
    pr.add_argument("songs", nargs="+", metavar="SONG", help="audio files")
    pr.add_argument("--name", help="a calibrated listener: the personal curve beside the generic one")
    pr.add_argument(
        "--model", metavar="RUN_DIR", help="base run (default: the profile's base run, else the latest finished run)"
    )
    pr.add_argument("--out", metavar="DIR", help="output folder (default: predictions/)")
    pr.add_argument("--no-plot", action="store_true", help="write the CSV files only")
    pr.add_argument("--annotators", metavar="DIR", help="profiles folder (default: annotators/)")
    pr.set_defaults(func=cmd_predict)


def _add_rate_command(sub) -> None:
    """Rate: the browser rating page, then calibrate."""
    ra = sub.add_parser(
        "rate",
        help="rate songs in the browser (a local page), then calibrate: annotators/NAME/",
        description="Serve a rating page on 127.0.0.1 (a random token in the printed address): it plays each --audio "
        "song and records valence and arousal while it plays, on a 2-D pad or one dimension per pass, after a short "
        "practice. On submit the ratings are binned to 2 Hz, calibrate runs (k-shot with several songs) and the page "
        "shows the fit and the --predict songs' personal and generic curves.",
    )
    ra.add_argument("--name", required=True, help="listener name: letters, digits, - and _ (checked as calibrate does)")
    ra.add_argument(
        "--audio",
        required=True,
        action="extend",
        nargs="+",
        metavar="SONG",
        help="a song to rate (repeat for k-shot); wav, flac, mp3 or ogg; the page plays only these",
    )
    ra.add_argument(
        "--predict",
        action="extend",
        nargs="+",
        metavar="SONG",
        help="songs to predict with the new profile: personal against generic curve (CSV + PNG)",
    )
    ra.add_argument("--model", metavar="RUN_DIR", help="base run (default: the latest finished run in runs/)")
    ra.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1, this machine only; another one is warned about)",
    )
    ra.add_argument("--port", type=int, default=0, help="port (default: any free one)")
    ra.add_argument("--no-browser", action="store_true", help="do not try to open the page in a browser")
    ra.add_argument(
        "--practice-s",
        type=float,
        default=8.0,
        metavar="S",
        help="seconds of practice at the song's start, not recorded (default 8; 0 = none)",
    )
    ra.add_argument(
        "--keep-history", action="store_true", help="keep a replaced profile in annotators/.history/NAME/<time>/"
    )
    ra.add_argument("--out", metavar="DIR", help="where --predict curves go (default: predictions/)")
    ra.add_argument("--annotators", metavar="DIR", help="profiles folder (default: annotators/)")
    ra.set_defaults(func=cmd_rate)


def _add_data_command(sub) -> None:
    """Data check: a dataset validated as training reads it."""
    d = sub.add_parser("data", help="dataset tools: `data check --format deam|pmemo|vgmidi|generic|synthetic ROOT`")
    dsub = d.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    dc = dsub.add_parser(
        "check",
        help="validate a dataset and print a summary; exit 1 listing every problem",
        description="Read a dataset as training would and print songs, listeners, ratings per listener, labelled time, "
        "label ranges, what was filtered and why, and every problem with its file and line or song. Exit 0 when "
        "there is none, 1 otherwise.",
    )
    dc.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="deam / pmemo: the official folders; generic: audio/ + ratings.csv; synthetic: the embedded benchmark",
    )
    dc.add_argument("root", nargs="?", help="dataset folder (synthetic: optional, default = the default benchmark)")
    dc.add_argument(
        "overrides", nargs="*", help="data options, e.g. data.deam.min_songs_per_listener=10 data.pmemo.scale=deam"
    )
    dc.add_argument(
        "--audio",
        choices=("decode", "header", "none"),
        default="decode",
        help="decode every file as training does (default), read headers only (fast), or only note missing files",
    )
    dc.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    dc.add_argument("--verbose-report", action="store_true", help="list every problem and every dropped item")
    dc.set_defaults(func=cmd_data_check)


def _add_sweep_command(sub) -> None:
    """Sweep: an optuna study over a sweep file."""
    sw = sub.add_parser(
        "sweep",
        help="hyperparameter sweep with optuna (experiments/sweeps/*.yaml); run it again to continue",
        description="Run trials (each a normal run folder) until the study has N finished (complete or pruned) trials, "
        "pruning poor ones at validation, then write runs/sweeps/<study>/: summary.md/.json, plots and best.yaml. "
        "The same command continues an interrupted sweep; "
        "several processes or machines share a study through --storage.",
    )
    sw.add_argument("sweep", help="name in experiments/sweeps/ (e.g. pdmer.synthetic.dsaml) or a YAML path")
    sw.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides of the base experiment for every trial, e.g. train.iterations=100",
    )
    sw.add_argument(
        "--trials",
        type=int,
        metavar="N",
        help="finished trials the study should have (default: the sweep file's trials)",
    )
    sw.add_argument(
        "--storage",
        metavar="URL",
        help="optuna RDB URL, e.g. postgresql+psycopg2://user:password@host/db "
        "(default: SQLite runs/sweeps/<study>/study.db)",
    )
    sw.add_argument("--study", metavar="NAME", help="study name (default: the sweep file's name)")
    sw.set_defaults(func=cmd_sweep)


def parse(argv: list[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse a command line; ``key=value`` overrides may stand anywhere after the command.

    argparse alone accepts positional overrides only in one run (``reproduce EXP --seeds 0 1
    --resume a.b=1`` would fail), so they are taken out first and appended, in order.
    """
    parser = parser or build_parser()
    argv = argv or ["train"]
    command = next((a for a in argv if not a.startswith("-")), None)
    extra: list[str] = []
    if command in TAKES_OVERRIDES:
        i = argv.index(command)
        extra = [a for a in argv[i + 1 :] if OVERRIDE.match(a)]
        argv = argv[: i + 1] + [a for a in argv[i + 1 :] if not OVERRIDE.match(a)]
    args = parser.parse_args(argv)
    if extra:
        args.overrides = list(args.overrides or []) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parse(argv, parser)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.command is None:
        parser.print_help()
        return 2
    from pdmer.runs import code_info

    code_info()  # the code this process starts with: what its results record (pdmer.runs.code_info)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        return report_error(e, args.debug)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a mistake in the input or the environment, not a bug: one `error:` line, exit 2."""
    import yaml

    from pdmer.checkpoint import CheckpointError
    from pdmer.config import ConfigError
    from pdmer.data.types import DataError
    from pdmer.personal import ProfileError

    # OSError: a path that is missing, a folder where a file is expected, no permission, a full disk;
    # FloatingPointError: training diverged (pdmer.training), a matter of settings
    return ConfigError, DataError, CheckpointError, ProfileError, OSError, yaml.YAMLError, FloatingPointError


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    return msg


def report_error(e: Exception, debug: bool = False) -> int:
    """Print an exception for the user and return the exit code.

    A user mistake (:func:`user_errors`) prints ``error: <message>`` (the message may go on over
    indented lines, e.g. a list of problems) and returns 2; ``debug`` adds the traceback. Anything
    else is a bug: the traceback, then an ``error:`` line saying so, and 1.
    """
    import traceback

    if isinstance(e, user_errors()):
        if debug:
            traceback.print_exception(e, file=sys.stderr)
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    traceback.print_exception(e, file=sys.stderr)
    print(
        f"error: unexpected {type(e).__name__}: {_one_line(e)} "
        "(a bug in pdmer: please report it with the traceback above)",
        file=sys.stderr,
    )
    return 1
