"""Rate a song in the browser: the listener's side of calibration (``python run.py rate``).

A local web server plays the songs named on the command line; the listener rates valence and
arousal while each plays (a 2-D pad, or DEAM's one dimension per pass), after a short practice
that is not recorded. On submit the server bins the pointer samples onto pdmer's 2 Hz grid
(:mod:`pdmer.rate.submission`), writes them in the generic ratings layout, runs
:func:`pdmer.calibrate` (k-shot with several songs) and shows the fit and, for ``--predict``
songs, the personal against the generic curve. The server and its security rules are in
:mod:`pdmer.rate.server`; the page (one HTML file, plain JavaScript and CSS, nothing fetched
from elsewhere) in ``pdmer/rate/static/``.

Example::

    from pdmer.rate import RateServer, RateSession

    session = RateSession("P017", ["calibration.wav"], predict=["other.mp3"])
    server = RateServer(session)      # 127.0.0.1, a free port, a random token
    url = server.url                  # the address to open, with its access token
    server.serve()                    # until Ctrl-C
"""

from pdmer.rate.server import RateServer, RateSession, make_app, synthetic_warning
from pdmer.rate.submission import SubmissionError, bin_to_grid, parse_submission, ratings_csv

__all__ = [
    "RateServer",
    "RateSession",
    "SubmissionError",
    "bin_to_grid",
    "make_app",
    "parse_submission",
    "ratings_csv",
    "synthetic_warning",
]
