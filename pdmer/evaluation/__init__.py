"""Evaluation: sliding-window inference (:mod:`~pdmer.evaluation.inference`), the PDMER protocol for one
listener (:mod:`~pdmer.evaluation.protocol`), a split of a run scored and the safe rule chosen
(:mod:`~pdmer.evaluation.split`), and what is reported (:mod:`~pdmer.evaluation.report`).

    from pdmer.evaluation import evaluate_run

    results = evaluate_run(Path("runs/pdmer.synthetic.dsaml-10270034"))  # python run.py evaluate RUN
"""

__all__ = ["evaluate_run"]


def __getattr__(attr: str):
    # imported on first use: training and evaluation import each other's modules (not their packages)
    if attr == "evaluate_run":
        from pdmer.evaluation.split import evaluate_run

        return evaluate_run
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
