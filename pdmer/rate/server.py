"""The rating page's server: one listener, the songs named on the command line, then ``calibrate``.

A :class:`RateSession` holds what the page may touch (the listener's name, checked as
``calibrate`` checks it; the songs, by index; the base model) and turns a submission into a
profile with the public API (:func:`pdmer.calibrate`, then :func:`pdmer.predict` for the
``--predict`` songs). :func:`make_app` wraps it in a Starlette application and
:class:`RateServer` serves that with uvicorn.

Security (it is a server):

- it binds to 127.0.0.1 unless told otherwise; with another host it still answers only the
  token's holder, and the command warns;
- every request must start its path with the random token of the printed address
  (``http://127.0.0.1:PORT/<token>/``), compared in constant time: 403 otherwise. The static
  page's relative links carry it; nothing else is reachable;
- the ``Host`` header must name the address served (400 otherwise: a DNS-rebinding page cannot
  reach the server under a foreign name), and a cross-origin ``Origin`` is refused (403);
- the page can play only the songs given on the command line, by index: no path comes from the
  browser; results are fixed files (the profile's ``fit.png``, the predictions' PNGs);
- request bodies are bounded (413), submissions are checked before anything is written
  (:mod:`pdmer.rate.submission`: 400 / 422), one calibration runs at a time (409);
- the profile is replaced only as ``calibrate`` replaces it (a new folder renamed into place);
- responses forbid scripts, styles and media from anywhere but the server itself
  (Content-Security-Policy), framing, sniffing, referrers and caching.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit

from pdmer import paths
from pdmer.rate.submission import MAX_RATE_HZ, SubmissionError, parse_submission, ratings_csv

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
REPO = paths.home()  # outputs' home (pdmer.paths)
MEDIA_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg", ".ogg": "audio/ogg"}
PRACTICE_S = 8.0  # the practice run, from the start of the song, not recorded
SAMPLE_HZ = 40  # the page samples the pointer this often (against the audio clock)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"media-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


@dataclass(frozen=True)
class RateSong:
    """A song the page may play and rate, known by its index."""

    index: int
    path: Path
    song_id: str
    duration_s: float
    media_type: str


def _audio_info(path: Path) -> float:
    """Duration in seconds from the header; DataError when missing or unreadable."""
    import soundfile as sf

    from pdmer.data.types import DataError

    if not path.is_file():
        raise DataError(f"{path}: audio file not found")
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises several types
        raise DataError(f"{path}: cannot read audio header ({e})") from None
    if info.samplerate <= 0 or info.frames <= 0:
        raise DataError(f"{path}: no audio frames")
    return info.frames / info.samplerate


def _display(path: Path) -> str:
    """A path relative to the home folder when inside it (what the page and the command show)."""
    return paths.display(path, REPO)


def synthetic_warning(base) -> str | None:
    """The page's warning when the base run was trained on the embedded synthetic benchmark only."""
    if getattr(base.cfg.data, "source", None) != "synthetic":
        return None
    return (
        f"The model {base.name} was trained on pdmer's synthetic benchmark only (data.source=synthetic): "
        "its curves mean little for real music. Use it to try the page; for real listeners, train on real "
        "ratings (DEAM, PMEmo or your own) and pass --model RUN_DIR."
    )


class RateSession:
    """One listener rating the songs given, and what a submission turns into.

    Args:
        name: the listener (checked exactly as ``calibrate`` checks it).
        audio: the songs to rate (wav, flac, mp3, ogg); song id = file stem, ids must differ.
        predict: songs to predict with the new profile after calibration (personal vs generic PNGs).
        model: base run folder; None = the latest finished run (as ``calibrate``).
        annotators_dir: where profiles live (None = ``<repo>/annotators``).
        out_dir: where predictions go (None = ``<repo>/predictions``).
        runs_dir: where runs live (None = ``<repo>/runs``).
        keep_history: keep a replaced profile in ``.history/`` (as ``calibrate --keep-history``).
        practice_s: seconds of practice at the start of the song (not recorded); 0 = none.
        base: an already loaded base model (then ``model``, ``runs_dir``, ``device`` are unused).
        device: None = the run's ``runtime.device``.

    Raises:
        ProfileError: bad name, no usable base run.
        DataError: a missing or unreadable song, two songs with one id, a song too short to rate.
    """

    def __init__(
        self,
        name: str,
        audio: Iterable[str | Path],
        predict: Iterable[str | Path] = (),
        model=None,
        *,
        annotators_dir=None,
        out_dir=None,
        runs_dir=None,
        keep_history: bool = False,
        practice_s: float = PRACTICE_S,
        base=None,
        device: str | None = None,
    ) -> None:
        from pdmer import personal
        from pdmer.data.types import DataError
        from pdmer.personal import load_base_model, profile_dir

        min_rated = getattr(personal, "MIN_RATED_S", 10.0)  # what calibrate requires of each song

        self.profile_path = profile_dir(name, annotators_dir)  # calibrate's own check of the name
        self.name = name
        self.annotators_dir = self.profile_path.parent
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.keep_history = keep_history
        self.practice_s = max(0.0, float(practice_s))
        self.min_rated_s = min_rated
        songs: list[RateSong] = []
        for i, a in enumerate(audio):
            p = Path(a)
            ext = p.suffix.lower()
            if ext not in MEDIA_TYPES:
                raise DataError(f"{p}: the page plays {', '.join(MEDIA_TYPES)} files")
            if any(s.song_id == p.stem for s in songs):
                raise DataError(
                    f"two songs have the id {p.stem!r}: {next(s.path for s in songs if s.song_id == p.stem)} and {p}"
                )
            d = _audio_info(p)
            if d < min_rated + 0.5:
                raise DataError(f"{p}: {d:.1f} s long; calibration needs at least {min_rated:g} s rated")
            songs.append(RateSong(i, p.resolve(), p.stem, d, MEDIA_TYPES[ext]))
        if not songs:
            raise DataError("rate needs at least one song (--audio SONG)")
        self.songs = songs
        self.predict_paths = [Path(p) for p in predict]
        for p in self.predict_paths:
            _audio_info(p)
        self.base = base or load_base_model(model, runs_dir, device)
        self.warning = synthetic_warning(self.base)
        self.result: dict | None = None
        self._pngs: dict[str, Path] = {}
        self._version = 0
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------------

    def describe(self) -> dict:
        """What the page shows: who, which model (and its warning), the songs by index, the limits."""
        b = self.base
        return {
            "name": self.name,
            "profile": _display(self.profile_path),
            "profile_exists": (self.profile_path / "profile.json").is_file(),
            "model": {
                "run": _display(b.run),
                "experiment": b.cfg.name,
                "how": b.how,
                "data_source": b.cfg.data.source,
                "warning": self.warning,
            },
            "songs": [
                {
                    "index": s.index,
                    "song_id": s.song_id,
                    "duration_s": round(s.duration_s, 3),
                    "audio": f"audio/{s.index}",
                }
                for s in self.songs
            ],
            "predict": [p.stem for p in self.predict_paths],
            "practice_s": self.practice_s,
            "sample_hz": SAMPLE_HZ,
            "max_rate_hz": MAX_RATE_HZ,
            "min_rated_s": self.min_rated_s,
            "result": self.result,
        }

    def png(self, key: str) -> Path | None:
        """A result image by its fixed key (``fit`` or ``predict/<i>``), or None."""
        p = self._pngs.get(key)
        return p if p is not None and p.is_file() else None

    def submit(self, body: bytes) -> dict:
        """Check, bin and write the ratings, calibrate, predict; the result the page shows.

        Raises:
            SubmissionError: 400 / 422 with a message (nothing written), 409 while another calibration runs.
        """
        from pdmer.data.types import DataError
        from pdmer.personal import ProfileError, calibrate, predict

        mode, rated = parse_submission(body, [(s.song_id, s.duration_s) for s in self.songs], self.min_rated_s)
        if not self._lock.acquire(blocking=False):
            raise SubmissionError("a calibration is already running; wait for it to finish", 409)
        try:
            t0 = time.perf_counter()
            # the binned ratings go to a private temporary file; calibrate copies them into the profile
            # (annotators/NAME/ratings.csv) and installs that crash-safely, or refuses and writes nothing
            stage = Path(tempfile.mkdtemp(prefix=f"pdmer-rate-{self.name}-"))
            try:
                ratings = stage / f"{self.name}.browser.csv"
                ratings.write_text(ratings_csv(rated, self.name))
                audio = [self.songs[r.index].path for r in rated]
                try:
                    prof = calibrate(
                        self.name,
                        audio,
                        ratings,
                        annotators_dir=self.annotators_dir,
                        keep_history=self.keep_history,
                        base=self.base,
                    )
                except (DataError, ProfileError) as e:
                    raise SubmissionError(f"calibration refused the ratings: {e}", 422) from None
            finally:
                shutil.rmtree(stage, ignore_errors=True)
            preds, predict_error = [], None
            if self.predict_paths:
                try:
                    preds = predict(
                        self.predict_paths,
                        name=self.name,
                        base=self.base,
                        annotators_dir=self.annotators_dir,
                        out_dir=self.out_dir,
                    )
                except (DataError, ProfileError) as e:  # the profile is saved; say why the curves are missing
                    predict_error = str(e)
                    log.warning("prediction after calibration failed: %s", e)
            self._version += 1
            self.result = self._result(prof, preds, time.perf_counter() - t0)
            self.result["predict_error"] = predict_error
            return self.result
        finally:
            self._lock.release()

    def _result(self, prof, preds, seconds: float) -> dict:
        v = self._version
        self._pngs = {}
        if prof.fit_png.is_file():
            self._pngs["fit"] = prof.fit_png
        out_preds = []
        for i, p in enumerate(preds):
            if p.png is not None:
                self._pngs[f"predict/{i}"] = p.png
            out_preds.append(
                {
                    "song_id": p.song_id,
                    "csv": _display(p.csv) if p.csv else None,
                    "png": f"result/predict/{i}.png?v={v}" if p.png is not None else None,
                }
            )
        info = prof.info
        return {
            "ok": True,
            "name": prof.name,
            "profile": _display(prof.path),
            "files": [f.name for f in prof.files],
            "model": info["base"]["run"],
            "songs": info["songs"],
            "fit": info["fit"]["mean"],
            "fit_per_song": info["fit"]["per_song"],
            "fit_note": info["fit"]["note"],
            "fit_png": f"result/fit.png?v={v}" if "fit" in self._pngs else None,
            "predictions": out_preds,
            "seconds": round(seconds, 2),
            "warning": self.warning,
        }


# -------------------------------------------------------------------------------------------
# The web application
# -------------------------------------------------------------------------------------------


def _text(status: int, message: str):
    from starlette.responses import PlainTextResponse

    return PlainTextResponse(message + "\n", status_code=status)


class Guard:
    """ASGI middleware: the Host header, the token in the path and the Origin, before any route."""

    def __init__(self, app, token: str, hosts: set[str] | None) -> None:
        self.app = app
        self.prefix = f"/{token}"
        self.hosts = hosts  # allowed Host header values ("127.0.0.1:8000", ...); None = any (wildcard bind)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers
        from starlette.responses import RedirectResponse

        headers = Headers(scope=scope)
        host = headers.get("host", "").lower()
        if self.hosts is not None and host not in self.hosts:
            return await _text(400, f"refused: Host {host[:80]!r} is not this server's address")(scope, receive, send)
        path = scope.get("path", "")
        head, _, rest = path[1:].partition("/")
        if not hmac.compare_digest(("/" + head).encode(), self.prefix.encode()):
            return await _text(
                403,
                "refused: missing or wrong access token; open the address that "
                "`python run.py rate` printed (it holds the token)",
            )(scope, receive, send)
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host:
            return await _text(403, f"refused: cross-origin request from {origin[:80]!r}")(scope, receive, send)
        if path == self.prefix:
            return await RedirectResponse(self.prefix + "/", status_code=307)(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + SECURITY_HEADERS}
            await send(message)

        return await self.app(scope, receive, send_with_headers)


def max_body_bytes(session: RateSession) -> int:
    """The largest submission accepted: every song at ``MAX_RATE_HZ`` in both dimensions, 40 bytes a sample, plus 64 KiB."""
    total = sum(s.duration_s for s in session.songs)
    return int(65536 + total * MAX_RATE_HZ * 2 * 40)


def make_app(session: RateSession, token: str, hosts: set[str] | None):
    """The Starlette application of one session; ``hosts`` = the allowed Host values (None = any)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    async def index(request: Request):
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    async def describe(request: Request):
        return JSONResponse(session.describe())

    async def audio(request: Request):
        i = request.path_params["index"]
        if not 0 <= i < len(session.songs):
            return _text(404, f"no song {i}: the page plays songs 0 to {len(session.songs) - 1}")
        s = session.songs[i]
        return FileResponse(s.path, media_type=s.media_type)

    async def submit(request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return JSONResponse(
                {"ok": False, "error": "the submission must be sent as application/json"}, status_code=415
            )
        body = await request.body()  # bounded by max_body_size: 413 beyond
        try:
            result = await run_in_threadpool(session.submit, body)
        except SubmissionError as e:
            log.info("submission refused (%d): %s", e.status, e)
            return JSONResponse({"ok": False, "error": str(e)}, status_code=e.status)
        return JSONResponse(result)

    async def fit_png(request: Request):
        p = session.png("fit")
        return FileResponse(p, media_type="image/png") if p else _text(404, "no fit plot yet: submit ratings first")

    async def predict_png(request: Request):
        p = session.png(f"predict/{request.path_params['index']}")
        return FileResponse(p, media_type="image/png") if p else _text(404, "no such prediction plot")

    routes = [
        Mount(
            f"/{token}",
            routes=[
                Route("/", index),
                Route("/api/session", describe),
                Route("/api/submit", submit, methods=["POST"]),
                Route("/audio/{index:int}", audio),
                Route("/result/fit.png", fit_png),
                Route("/result/predict/{index:int}.png", predict_png),
                Mount("/static", app=StaticFiles(directory=STATIC)),
            ],
        ),
    ]
    return Starlette(
        routes=routes, middleware=[Middleware(Guard, token=token, hosts=hosts)], max_body_size=max_body_bytes(session)
    )


# -------------------------------------------------------------------------------------------
# Serving
# -------------------------------------------------------------------------------------------


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class RateServer:
    """Serve a session with uvicorn on ``host:port`` (port 0 = any free port).

    The socket is bound at construction, so ``url`` is known before serving. :meth:`serve`
    runs in the foreground (Ctrl-C stops it cleanly: uvicorn finishes the request in flight, a
    second Ctrl-C quits at once, and a calibration interrupted there leaves the old profile,
    as ``calibrate`` guarantees); :meth:`start` / :meth:`stop` run it in a thread (tests, notebooks).

    Attributes:
        url: the address to open, token included.
        warning: set when the server listens beyond the loopback interface.
    """

    def __init__(self, session: RateSession, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> None:
        self.session = session
        self.host = host
        self.token = token or secrets.token_urlsafe(24)
        fam, _, _, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self.sock = socket.create_server(addr[:2], family=fam, reuse_port=False)
        self.port = self.sock.getsockname()[1]
        self.warning = None
        if host in WILDCARD:
            hosts = None
            shown = socket.gethostname()
            self.warning = (
                f"listening on every network interface ({host or '*'}:{self.port}): anyone who can reach this "
                "machine and learns the address (it holds the token) can rate as this listener"
            )
        else:
            names = {host.lower(), *LOOPBACK} if host not in LOOPBACK else set(LOOPBACK)
            hosts = {f"{_url_host(n)}:{self.port}" for n in names}
            shown = host
            if host not in LOOPBACK:
                self.warning = (
                    f"listening on {host}:{self.port}, not only on this machine (127.0.0.1): anyone who can "
                    "reach it and learns the address (it holds the token) can rate as this listener"
                )
        self.url = f"http://{_url_host(shown)}:{self.port}/{self.token}/"
        self.app = make_app(session, self.token, hosts)
        self._server = None
        self._thread: threading.Thread | None = None

    def _uvicorn(self):
        import uvicorn

        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,  # the token is in every path
            lifespan="off",
            timeout_graceful_shutdown=None,
        )
        self._server = uvicorn.Server(config)
        return self._server

    def serve(self) -> None:
        """Serve until Ctrl-C (SIGINT) or SIGTERM."""
        try:
            self._uvicorn().run(sockets=[self.sock])
        finally:
            self.sock.close()

    def start(self, timeout: float = 30.0) -> "RateServer":
        """Serve in a background thread; returns once it accepts connections."""
        server = self._uvicorn()
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [self.sock]}, name="pdmer-rate", daemon=True
        )
        self._thread.start()
        t_end = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > t_end:
                raise RuntimeError("the rating server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop a server started with :meth:`start` (waits for the request in flight, at most ``timeout`` s)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(5)
            self._thread = None
        self.sock.close()

    def __enter__(self) -> "RateServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def can_open_browser() -> bool:
    """Whether ``webbrowser.open`` would reach a graphical browser (not a text one in this terminal)."""
    import os
    import sys

    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
