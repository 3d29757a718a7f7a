"""Personal profiles: calibrate the meta-trained model to one listener, then predict with it.

:func:`calibrate` runs the inner loop of meta-training (same loss, number of steps and
learning rate as the base run, unless overridden) on a listener's ratings of one or more
songs and saves a *profile*; :func:`predict` writes whole-song valence / arousal curves,
generic and (with a profile) personal. ``python run.py calibrate`` / ``predict`` call them.
:func:`calibrate_many` calibrates every listener of a study file (generic layout, one profile
per ``annotator_id``), each as :func:`calibrate` would, reporting and skipping the bad ones.

A profile is a folder ``<annotators>/<NAME>/`` (``<annotators>`` = ``<repo>/annotators``
unless given)::

    profile.json          who, when, base run (config hash, feature hash, weights sha256),
                          songs used, inner steps and lr, fit metrics on the support song(s)
    weights.safetensors   the adapted parameters only (the base run's buffers are unchanged);
                          its header repeats the base model's hashes
    ratings.csv           a byte copy of the ratings file the profile was calibrated on
    fit.png               ratings, generic and personal curves on the support song(s)
    MANIFEST.json         size and sha256 of each file above, written last: the profile is complete

Safety:

- names are letters, digits, ``-`` and ``_`` (at most 64), so no path leaves ``<annotators>``;
  ``example`` is reserved for the example ratings kept in git;
- weights are read with safetensors only: a pickle (``torch.save``) is refused, never
  unpickled, since unpickling can run code;
- a profile is used only with the base model it was calibrated on: the run's config hash,
  the feature settings' hash and the checkpoint's sha256 must all match, otherwise the
  error names both models.

Crash safety (:mod:`pdmer.store`): one calibration of a name at a time (an ``flock`` on
``<annotators>/.locks/<NAME>.lock``; a second one is refused at once). A profile is written into
``<annotators>/.<NAME>.tmp-*`` with ``MANIFEST.json`` (sha256 of every file) last, and renamed into
place only once complete; the previous profile is renamed aside first and deleted (or, with
``keep_history``, moved to ``<annotators>/.history/<NAME>/<UTC time>/``) only after the new one is
in place. After a crash at any point, the next calibration or read of that name restores a
complete copy (one whose manifest verifies) and deletes every leftover. Names cannot start with
a dot, so these folders never clash with a profile.

Divergence: a calibration whose loss, weights or support curves are non-finite or absurd is
refused (:func:`check_finite_adaptation`) and nothing is saved; a profile with non-finite weights
is refused when read.

Time convention (``pdmer.data.types``): step ``k`` covers audio ``[0.5 k, 0.5 k + 0.5)`` s and is
written with ``time_s = 0.5 k``, so a prediction CSV read back as ratings lands on the same steps.

Layout: :mod:`~pdmer.personal.names` (names and folders), :mod:`~pdmer.personal.base` (run discovery,
base-model loading), :mod:`~pdmer.personal.ratings` (the ratings reader), :mod:`~pdmer.personal.adaptation`
(support batches, the safe rule, the divergence check), :mod:`~pdmer.personal.profile` (the profile store),
:mod:`~pdmer.personal.calibration`, :mod:`~pdmer.personal.batch` (many listeners at once),
:mod:`~pdmer.personal.prediction` and :mod:`~pdmer.personal.writers` (CSV and plots); long songs are
featurised by :mod:`pdmer.features.streaming`.
"""

from pdmer.features.audio import check_audio_file
from pdmer.features.streaming import (
    STREAM_CORE_S,
    STREAM_MARGIN_S,
    STREAM_MIN_S,
    song_features,
)
from pdmer.personal.adaptation import (
    DIVERGE_FACTOR,
    PRED_LIMIT,
    PREDICT_BATCH_STEPS,
    PREDICT_BATCH_WINDOWS,
    AdaptationError,
    adaptation_problem,
    check_finite_adaptation,
)
from pdmer.personal.base import (
    DEFAULT_RUNS_DIR,
    BaseModel,
    features_hash,
    find_latest_run,
    load_base_model,
)
from pdmer.personal.batch import BatchReport, calibrate_many
from pdmer.personal.calibration import calibrate
from pdmer.personal.names import (
    DEFAULT_ANNOTATORS_DIR,
    FIT_FILE,
    HISTORY_DIR,
    NAME_RE,
    PROFILE_FILE,
    PROFILE_FORMAT,
    PROFILE_VERSION,
    RATINGS_FILE,
    REPO,
    RESERVED_NAMES,
    WEIGHTS_FILE,
    ProfileError,
    _display,
    check_name,
    profile_dir,
)
from pdmer.personal.prediction import DEFAULT_PREDICTIONS_DIR, SongPrediction, predict
from pdmer.personal.profile import Profile, check_compatible, load_profile
from pdmer.personal.ratings import (
    DENSE_PER_STEP,
    KNOWN_SCALES,
    MAX_RATINGS_BYTES,
    MIN_RATED_S,
    _read_ratings,
    read_ratings,
)

__all__ = [
    "BaseModel",
    "BatchReport",
    "Profile",
    "ProfileError",
    "SongPrediction",
    "AdaptationError",
    "adaptation_problem",
    "calibrate",
    "calibrate_many",
    "check_audio_file",
    "check_compatible",
    "check_finite_adaptation",
    "check_name",
    "find_latest_run",
    "load_base_model",
    "load_profile",
    "predict",
    "profile_dir",
    "read_ratings",
]
