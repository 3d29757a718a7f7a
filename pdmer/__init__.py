"""pdmer: personalized dynamic music emotion recognition (DSAML)."""

__version__ = "0.1.0"

# The Python API behind ``python run.py calibrate`` / ``predict`` (pdmer.personal), imported
# on first use so that ``import pdmer`` stays light.
_PERSONAL = ("calibrate", "calibrate_many", "predict", "load_profile", "load_base_model", "ProfileError")


def __getattr__(name: str):
    if name in _PERSONAL:
        from pdmer import personal

        return getattr(personal, name)
    raise AttributeError(f"module 'pdmer' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_PERSONAL])
