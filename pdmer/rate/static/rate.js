// pdmer rating page: plain JavaScript, no libraries, nothing fetched but this server's own files.
//
// The audio element's clock (currentTime) times every sample: the pointer's position is read
// SAMPLE_HZ times a second while the song plays, and sent raw; the server bins the samples into
// pdmer's 0.5 s steps. Pausing, leaving the window or seeking pauses the recording; a take resumes
// where it stopped. The practice run (the song's first seconds) is drawn but never sent.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const audio = $("audio");
  const pad = $("pad");
  const timeline = $("timeline");
  const COLORS = { valence: "#1b8a7a", arousal: "#d9642b", practice: "#a9b0bb", rec: "#d22f3c", ink: "#1f2430" };
  const QUADRANTS = [
    // [valence sign, arousal sign, words]
    [1, 1, ["happy", "excited", "elated"]],
    [-1, 1, ["tense", "angry", "afraid"]],
    [-1, -1, ["sad", "gloomy", "bored"]],
    [1, -1, ["calm", "relaxed", "serene"]],
  ];

  const S = {
    info: null,
    song: 0,             // index of the song on the page
    mode: "pad",         // "pad": both dimensions at once; "passes": valence pass, then arousal pass
    phase: "loading",    // loading | idle | practice | recording | paused | done | submitting
    pass: "valence",     // the dimension being recorded in "passes" mode
    takes: [],           // per song: {valence: [[t, x]], arousal: [[t, x]], done: {pad, valence, arousal}}
    practice: [],        // [[t, v, a]] drawn only
    pointer: null,       // {v, a} in [-1, 1], null until the pointer has been on the pad
    lastT: -1,           // time of the last recorded sample of the current pass
    ownSeek: false,
    timer: null,
  };

  // ---------------------------------------------------------------------------------------
  // helpers
  // ---------------------------------------------------------------------------------------

  const clamp = (x) => Math.max(-1, Math.min(1, x));
  const round = (x, d) => Math.round(x * 10 ** d) / 10 ** d;
  const fmt = (x) => (Number.isFinite(x) ? x.toFixed(3) : "–");

  function setStatus(text, error = false) {
    const el = $("status");
    el.textContent = text;
    el.classList.toggle("error", error);
  }

  function setPhase(phase) {
    S.phase = phase;
    document.body.dataset.phase = phase;
    const labels = { idle: "ready", practice: "practice", recording: "recording", paused: "paused", done: "done",
                     submitting: "calibrating", loading: "loading" };
    $("phase-label").textContent = labels[phase] || phase;
    updateButtons();
  }

  function take() { return S.takes[S.song]; }

  function dims() { return S.mode === "pad" ? ["valence", "arousal"] : [S.pass]; }

  function recordedSeconds(t, dim) {
    const s = t[dim];
    return s.length > 1 ? s[s.length - 1][0] - s[0][0] : 0;
  }

  function songComplete(t) {
    return S.mode === "pad" ? t.done.pad : t.done.valence && t.done.arousal;
  }

  function newTake() { return { valence: [], arousal: [], done: { pad: false, valence: false, arousal: false } }; }

  function duration() { return S.info ? S.info.songs[S.song].duration_s : 0; }

  // ---------------------------------------------------------------------------------------
  // buttons and song list
  // ---------------------------------------------------------------------------------------

  function updateButtons() {
    const p = S.phase;
    const busy = p === "loading" || p === "submitting";
    const t = S.info ? take() : null;
    const live = p === "recording" || p === "paused";
    $("practice").disabled = busy || live || p === "practice" || !S.info || S.info.practice_s <= 0;
    $("start").disabled = busy || live || p === "practice" || (t && songComplete(t));
    $("pause").disabled = !live;
    $("pause").textContent = p === "paused" ? "Resume" : "Pause";
    const enough = t && live && dims().every((d) => recordedSeconds(t, d) >= S.info.min_rated_s);
    $("finish").disabled = !enough;
    $("redo").disabled = busy || !t || (t.valence.length === 0 && t.arousal.length === 0);
    $("submit").disabled = busy || live || p === "practice" || !S.takes.some(songComplete);
    if (t && !live && songComplete(t)) {
      $("start").textContent = "Song rated";
    } else if (S.mode === "passes" && t && !live) {
      $("start").textContent = t.done.valence ? "Start the arousal pass" : "Start the valence pass";
    } else if (!live) {
      $("start").textContent = "Start rating";
    }
    for (const el of document.querySelectorAll('input[name="mode"]')) {
      el.disabled = busy || live || p === "practice" || S.takes.some((k) => k.valence.length || k.arousal.length);
    }
    renderSongs();
  }

  function renderSongs() {
    if (!S.info) return;
    const ul = $("songs");
    ul.replaceChildren();
    S.info.songs.forEach((s, i) => {
      const li = document.createElement("li");
      const t = S.takes[i];
      li.dataset.index = String(i);
      li.classList.toggle("current", i === S.song);
      li.classList.toggle("rated", songComplete(t));
      const name = document.createElement("span");
      name.textContent = `${s.song_id} (${s.duration_s.toFixed(1)} s)`;
      const state = document.createElement("span");
      state.className = "state";
      state.textContent = songComplete(t) ? "rated ✓"
        : (t.done.valence ? "valence done" : (t.valence.length || t.arousal.length ? "in progress" : "not rated"));
      li.append(name, state);
      li.addEventListener("click", () => selectSong(i));
      ul.append(li);
    });
  }

  function selectSong(i) {
    if (i === S.song || S.phase === "recording" || S.phase === "paused" || S.phase === "practice" || S.phase === "submitting") return;
    S.song = i;
    S.practice = [];
    loadAudio();
    setPhase(songComplete(take()) ? "done" : "idle");
    setStatus(songComplete(take()) ? "This song is rated. Redo it, choose another, or submit." : "Practise, then start rating.");
  }

  function loadAudio() {
    audio.src = S.info.songs[S.song].audio;
    audio.load();
  }

  // ---------------------------------------------------------------------------------------
  // the pointer on the pad
  // ---------------------------------------------------------------------------------------

  function onPointer(ev) {
    // the canvas's content box (inside its border) is the square [-1, 1] x [-1, 1]
    const r = pad.getBoundingClientRect();
    const x = ev.clientX - r.left - pad.clientLeft, y = ev.clientY - r.top - pad.clientTop;
    S.pointer = { v: clamp((2 * x) / pad.clientWidth - 1), a: clamp(1 - (2 * y) / pad.clientHeight) };
  }
  pad.addEventListener("pointermove", onPointer);
  pad.addEventListener("pointerdown", (ev) => {
    onPointer(ev);
    if (pad.setPointerCapture) pad.setPointerCapture(ev.pointerId); // a finger may slide off the pad
  });

  // ---------------------------------------------------------------------------------------
  // practice, recording
  // ---------------------------------------------------------------------------------------

  async function play() {
    try {
      await audio.play();
    } catch (e) {
      setStatus(`The browser would not play the song (${e.message}). Click the page, then try again.`, true);
      throw e;
    }
  }

  async function startPractice() {
    S.practice = [];
    seekTo(0);
    setPhase("practice");
    setStatus(`Practice: move the pointer with the music. The first ${S.info.practice_s} s play, and nothing is recorded.`);
    try { await play(); } catch (e) { setPhase("idle"); }
  }

  function endPractice() {
    audio.pause();
    seekTo(0);
    setPhase("idle");
    setStatus("Practice over. Start rating when you are ready: the song plays from the start.");
  }

  async function startTake() {
    const t = take();
    for (const d of dims()) t[d] = [];
    S.practice = [];
    S.lastT = -1;
    seekTo(0);
    setPhase("recording");
    const what = S.mode === "pad" ? "valence and arousal" : S.pass;
    setStatus(S.pointer ? `Recording ${what}: follow the music with the pointer.`
      : `Recording ${what}: put the pointer on the pad to begin.`);
    try { await play(); } catch (e) { setPhase("paused"); }
  }

  async function togglePause() {
    if (S.phase === "recording") {
      audio.pause();
    } else if (S.phase === "paused") {
      if (Math.abs(audio.currentTime - Math.max(S.lastT, 0)) > 0.3 && S.lastT >= 0) seekTo(S.lastT);
      setPhase("recording");
      setStatus("Recording again from where it stopped.");
      try { await play(); } catch (e) { setPhase("paused"); }
    }
  }

  function finishPass(reason) {
    const t = take();
    audio.pause();
    const short = dims().filter((d) => recordedSeconds(t, d) < S.info.min_rated_s);
    if (short.length) {
      setPhase("idle");
      for (const d of dims()) t[d] = [];
      setStatus(`Only ${recordedSeconds(t, short[0]).toFixed(1)} s were rated; at least ${S.info.min_rated_s} s are needed. Start again.`, true);
      return;
    }
    if (S.mode === "pad") {
      t.done.pad = true;
    } else {
      t.done[S.pass] = true;
      S.pass = t.done.valence ? "arousal" : "valence";
    }
    const next = S.info.songs.findIndex((_, i) => !songComplete(S.takes[i]));
    if (songComplete(t)) {
      setPhase("done");
      setStatus(`${reason} ${S.info.songs[S.song].song_id} is rated.` +
        (next >= 0 ? " Rate the next song, redo this one, or submit." : " Submit when you are happy with it, or redo it."));
    } else {
      setPhase("idle");
      setStatus(`${reason} The valence pass is done; now the arousal pass: the song plays again.`);
    }
  }

  function redo() {
    S.takes[S.song] = newTake();
    S.pass = "valence";
    audio.pause();
    seekTo(0);
    setPhase("idle");
    setStatus("Cleared. Start rating again when you are ready.");
  }

  function seekTo(t) {
    if (Math.abs(audio.currentTime - t) < 1e-3) return;
    S.ownSeek = true;
    audio.currentTime = t;
  }

  function tick() {
    if (audio.paused || audio.seeking || !S.pointer) return;
    const t = audio.currentTime;
    if (S.phase === "practice") {
      S.practice.push([t, S.pointer.v, S.pointer.a]);
      if (t >= Math.min(S.info.practice_s, duration() - 0.5)) endPractice();
      return;
    }
    if (S.phase !== "recording") return;
    const tr = round(t, 3);
    if (tr <= S.lastT) return; // the clock has not moved (or moved back): nothing new to record
    const cur = take();
    for (const d of dims()) cur[d].push([tr, round(d === "valence" ? S.pointer.v : S.pointer.a, 4)]);
    S.lastT = tr;
    if (cur[dims()[0]].length % 20 === 1) updateButtons();
  }

  audio.addEventListener("ended", () => {
    if (S.phase === "recording") finishPass("End of the song.");
    else if (S.phase === "practice") endPractice();
  });
  audio.addEventListener("pause", () => {
    if (S.phase === "recording" && !audio.ended) {
      setPhase("paused");
      setStatus("Paused: nothing is recorded while the song is paused. Resume (button or space bar) when ready.");
    }
  });
  audio.addEventListener("seeking", () => {
    if (S.ownSeek) return;
    if (S.phase === "recording" || S.phase === "paused") {
      audio.pause();
      setStatus("Seeking pauses the recording; it resumes where it stopped.");
    }
  });
  audio.addEventListener("seeked", () => {
    if (S.ownSeek) { S.ownSeek = false; return; }
    if ((S.phase === "paused" || S.phase === "recording") && S.lastT >= 0 && Math.abs(audio.currentTime - S.lastT) > 0.3) {
      seekTo(S.lastT);
    }
  });
  audio.addEventListener("error", () => setStatus("The song could not be loaded or decoded by this browser.", true));
  audio.addEventListener("loadedmetadata", () => {
    // the server measured the duration from the file; the browser's may differ by a frame
    if (!Number.isFinite(audio.duration)) return;
  });

  function pauseForFocus(why) {
    if (!audio.paused && (S.phase === "recording" || S.phase === "practice")) {
      audio.pause();
      if (S.phase === "practice") { endPractice(); return; }
      setStatus(`Paused: ${why}. Resume when ready.`);
    }
  }
  window.addEventListener("blur", () => pauseForFocus("the window lost focus"));
  document.addEventListener("visibilitychange", () => { if (document.hidden) pauseForFocus("the page was hidden"); });
  document.addEventListener("keydown", (ev) => {
    if (ev.code === "Space" && (S.phase === "recording" || S.phase === "paused")) {
      ev.preventDefault();
      togglePause();
    }
  });

  // ---------------------------------------------------------------------------------------
  // drawing
  // ---------------------------------------------------------------------------------------

  function fitCanvas(c) {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.round(c.clientWidth * dpr), h = Math.round(c.clientHeight * dpr);
    if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
    const ctx = c.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    return [ctx, c.clientWidth, c.clientHeight];
  }

  function drawPad() {
    const [ctx, w, h] = fitCanvas(pad);
    const X = (v) => ((v + 1) / 2) * w, Y = (a) => ((1 - a) / 2) * h;
    ctx.clearRect(0, 0, w, h);
    const tint = { "1,1": "#fff6e8", "-1,1": "#fdeeee", "-1,-1": "#eef1f8", "1,-1": "#ecf7f1" };
    for (const [sv, sa, words] of QUADRANTS) {
      ctx.fillStyle = tint[`${sv},${sa}`];
      ctx.fillRect(sv > 0 ? w / 2 : 0, sa > 0 ? 0 : h / 2, w / 2, h / 2);
      ctx.fillStyle = "#8d95a3";
      ctx.font = "13px system-ui, sans-serif";
      ctx.textAlign = "center";
      words.forEach((word, j) => ctx.fillText(word, X(sv * 0.55), Y(sa * 0.55) + (j - 1) * 16 + 4));
    }
    ctx.strokeStyle = "#b9c0cb";
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(w / 2, 0); ctx.lineTo(w / 2, h); ctx.moveTo(0, h / 2); ctx.lineTo(w, h / 2);
    ctx.stroke();
    ctx.fillStyle = "#9aa2ae";
    ctx.font = "11px system-ui, sans-serif";
    ctx.textAlign = "left"; ctx.fillText("valence →", w / 2 + 6, h / 2 - 6);
    ctx.save(); ctx.translate(w / 2 - 6, h / 2 - 8); ctx.rotate(-Math.PI / 2); ctx.fillText("arousal →", 0, 0); ctx.restore();

    // the trail: the last 8 s of this take (or of the practice), older points fainter
    const now = audio.currentTime;
    let pts = [];
    if (S.phase === "practice") {
      pts = S.practice.map(([t, v, a]) => [t, v, a]);
    } else if (S.info) {
      const t = take();
      if (S.mode === "pad") pts = t.valence.map(([tt, v], i) => [tt, v, t.arousal[i] ? t.arousal[i][1] : 0]);
    }
    pts = pts.filter((p) => p[0] > now - 8 && p[0] <= now + 0.01);
    ctx.lineWidth = 2.5;
    ctx.lineCap = "round";
    for (let i = 1; i < pts.length; i++) {
      const age = (now - pts[i][0]) / 8;
      ctx.strokeStyle = S.phase === "practice" ? COLORS.practice : COLORS.rec;
      ctx.globalAlpha = Math.max(0.08, 1 - age);
      ctx.beginPath();
      ctx.moveTo(X(pts[i - 1][1]), Y(pts[i - 1][2]));
      ctx.lineTo(X(pts[i][1]), Y(pts[i][2]));
      ctx.stroke();
    }
    ctx.globalAlpha = 1;
    if (S.pointer) {
      const { v, a } = S.pointer;
      ctx.fillStyle = S.phase === "recording" ? COLORS.rec : COLORS.ink;
      if (S.mode === "passes" && S.phase !== "practice") {
        ctx.strokeStyle = S.pass === "valence" ? COLORS.valence : COLORS.arousal;
        ctx.lineWidth = 3;
        ctx.beginPath();
        if (S.pass === "valence") { ctx.moveTo(X(v), 0); ctx.lineTo(X(v), h); } else { ctx.moveTo(0, Y(a)); ctx.lineTo(w, Y(a)); }
        ctx.stroke();
      } else {
        ctx.beginPath();
        ctx.arc(X(v), Y(a), 7, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
  }

  function drawTimeline() {
    const [ctx, w, h] = fitCanvas(timeline);
    ctx.clearRect(0, 0, w, h);
    if (!S.info) return;
    const dur = Math.max(duration(), 1);
    const left = 34, right = 8, top = 8, bottom = 20;
    const X = (t) => left + (t / dur) * (w - left - right);
    const Y = (x) => top + ((1 - x) / 2) * (h - top - bottom);
    ctx.strokeStyle = "#e3e6ec";
    ctx.fillStyle = "#8d95a3";
    ctx.font = "11px system-ui, sans-serif";
    ctx.lineWidth = 1;
    for (const x of [-1, 0, 1]) {
      ctx.beginPath(); ctx.moveTo(left, Y(x)); ctx.lineTo(w - right, Y(x)); ctx.stroke();
      ctx.textAlign = "right"; ctx.fillText(String(x), left - 6, Y(x) + 4);
    }
    const stepLabel = dur > 120 ? 30 : dur > 60 ? 10 : 5;
    ctx.textAlign = "center";
    for (let t = 0; t <= dur + 1e-6; t += stepLabel) ctx.fillText(`${t} s`, X(t), h - 5);
    const line = (pts, color, col = 1) => {
      ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.beginPath();
      pts.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[col])) : ctx.moveTo(X(p[0]), Y(p[col]))));
      ctx.stroke();
    };
    if (S.practice.length) { line(S.practice, COLORS.practice, 1); line(S.practice, COLORS.practice, 2); }
    const t = take();
    line(t.valence, COLORS.valence);
    line(t.arousal, COLORS.arousal);
    ctx.strokeStyle = COLORS.ink; ctx.lineWidth = 1;
    ctx.beginPath(); ctx.moveTo(X(audio.currentTime), top); ctx.lineTo(X(audio.currentTime), h - bottom); ctx.stroke();
  }

  function frame() {
    drawPad();
    drawTimeline();
    if (S.info) $("clock").textContent = `${audio.currentTime.toFixed(1)} / ${duration().toFixed(1)} s`;
    requestAnimationFrame(frame);
  }

  // ---------------------------------------------------------------------------------------
  // submit and results
  // ---------------------------------------------------------------------------------------

  async function submit() {
    const songs = [];
    S.takes.forEach((t, i) => { if (songComplete(t)) songs.push({ song: i, valence: t.valence, arousal: t.arousal }); });
    setPhase("submitting");
    setStatus(`Calibrating on ${songs.length} song(s)… this takes a few seconds to a minute.`);
    let res, body;
    try {
      res = await fetch("api/submit", { method: "POST", headers: { "Content-Type": "application/json" },
                                         body: JSON.stringify({ mode: S.mode, songs }) });
      const text = await res.text(); // JSON from the page's routes; plain text from the guards (403, 413, ...)
      try { body = JSON.parse(text); } catch (e) { body = { ok: false, error: `${res.status}: ${text.trim()}` }; }
    } catch (e) {
      body = { ok: false, error: `the server did not answer (${e.message}); is \`run.py rate\` still running?` };
    }
    setPhase(songComplete(take()) ? "done" : "idle");
    if (!body.ok) {
      setStatus(`Not calibrated: ${body.error}`, true);
      showError(body.error);
      return;
    }
    setStatus(`Calibrated in ${body.seconds} s: profile ${body.profile}. See the results below; you may redo a song and submit again.`);
    showResult(body);
  }

  function showError(msg) {
    const box = $("results");
    box.hidden = false;
    box.classList.add("error");
    box.replaceChildren(el("h2", "Not calibrated"), el("p", msg));
    box.dataset.ok = "false";
  }

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }

  function showResult(r) {
    const box = $("results");
    box.hidden = false;
    box.classList.remove("error");
    box.replaceChildren();
    box.append(el("h2", `Profile saved: ${r.profile}/`));
    box.append(el("p", `Calibrated ${r.model} on ${r.songs.map((s) => `${s.song_id} (${s.rated_from_s.toFixed(1)}–${s.rated_to_s.toFixed(1)} s)`).join(", ")}. Files: ${r.files.join(", ")}.`));
    const table = document.createElement("table");
    const head = document.createElement("tr");
    for (const h of ["curve", "CCC mean", "CCC arousal", "CCC valence", "RMSE arousal", "RMSE valence"]) head.append(el("th", h));
    table.append(head);
    for (const [label, key] of [["generic (no calibration)", "generic"], ["personal (calibrated)", "personalized"]]) {
      const m = r.fit[key];
      const tr = document.createElement("tr");
      tr.append(el("td", label));
      for (const k of ["ccc_mean", "ccc_arousal", "ccc_valence", "rmse_arousal", "rmse_valence"]) tr.append(el("td", fmt(m[k])));
      table.append(tr);
    }
    box.append(table);
    box.append(el("p", `Measured on the song(s) you just rated, the data the calibration was fitted to: it shows that calibration did something, not how well it generalises.`, "note"));
    if (r.warning) box.append(el("p", r.warning, "warning"));
    if (r.fit_png) {
      const img = el("img"); img.src = r.fit_png; img.alt = "your ratings, the generic and the personal curve";
      box.append(el("h3", "Your ratings, the generic and your personal curve"), img);
    }
    for (const p of r.predictions) {
      box.append(el("h3", `${p.song_id}: your personal curve against the generic one`));
      if (p.png) { const img = el("img"); img.src = p.png; img.alt = `prediction for ${p.song_id}`; box.append(img); }
      if (p.csv) box.append(el("p", `curves: ${p.csv}`, "note"));
    }
    box.dataset.ok = "true";
  }

  // ---------------------------------------------------------------------------------------
  // start
  // ---------------------------------------------------------------------------------------

  async function init() {
    let info;
    try {
      const res = await fetch("api/session");
      if (!res.ok) throw new Error(await res.text());
      info = await res.json();
    } catch (e) {
      setStatus(`Could not reach the rating server: ${e.message}`, true);
      return;
    }
    S.info = info;
    S.takes = info.songs.map(newTake);
    $("name").textContent = info.name;
    $("model").textContent = info.model.run;
    $("model-how").textContent = `(${info.model.experiment}; ${info.model.how})`;
    if (info.model.warning) { $("warning").hidden = false; $("warning").textContent = `Warning: ${info.model.warning}`; }
    $("practice").textContent = info.practice_s > 0 ? `Practice (first ${info.practice_s} s, not recorded)` : "No practice";
    document.querySelectorAll('input[name="mode"]').forEach((r) => r.addEventListener("change", () => {
      S.mode = r.value;
      S.pass = "valence";
      updateButtons();
      setStatus(S.mode === "pad" ? "2-D pad: rate valence and arousal at once." :
        "One at a time: the song plays twice, once for valence (left-right), once for arousal (up-down).");
    }));
    $("practice").addEventListener("click", startPractice);
    $("start").addEventListener("click", startTake);
    $("pause").addEventListener("click", togglePause);
    $("finish").addEventListener("click", () => finishPass("Stopped here."));
    $("redo").addEventListener("click", redo);
    $("submit").addEventListener("click", submit);
    loadAudio();
    S.timer = setInterval(tick, 1000 / info.sample_hz);
    setPhase("idle");
    setStatus(info.practice_s > 0 ? "Start with the practice: it plays the first seconds of the song and records nothing."
      : "Start rating when you are ready.");
    if (info.result) showResult(info.result);
    requestAnimationFrame(frame);
  }

  init();
})();
