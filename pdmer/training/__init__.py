"""Training: the run's context (:mod:`~pdmer.training.context`), the loop (:mod:`~pdmer.training.loop`) and
the training state it saves and resumes from (:mod:`~pdmer.training.state`).

    from pdmer.config import load_config
    from pdmer.training import train

    run = train(load_config("pdmer.synthetic.dsaml", ["train.iterations=20"]))
"""

__all__ = ["train"]


def __getattr__(attr: str):
    # imported on first use: training and evaluation import each other's modules (not their packages)
    if attr == "train":
        from pdmer.training.loop import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
