// The /speak page: one WebSocket session per (voice, language), audio played with Web Audio as it
// arrives. Plain script, no build step. Protocol: docs/protocol.md.
"use strict";

const $ = (id) => document.getElementById(id);
const SUBPROTOCOL = "makima-tts.v1";
const LEAD_S = 0.05; // scheduling margin: the first chunk starts this far ahead of "now"

// What the page measured, also read by the end-to-end browser test. ttfaMs is the last utterance's
// time to first audio as bench defines it: from sending the text to its first sample reaching the
// speakers (scheduled start plus the output latency); arrivalMs ends at the first chunk's arrival.
const stats = (window.makimaStats = {
  chunks: 0, bytes: 0, scheduledS: 0, completes: 0, errors: [], last: null, ttfaMs: null, arrivalMs: null,
});
let info = null;
let session = null; // { ws, key, ready: Promise }
let player = null; // { ctx, next } for gapless scheduling
let pending = null; // the utterance in flight: { id, sentAt, firstAt } (performance.now() ms)
let utteranceSeq = 0;

function log(msg) {
  const line = `${new Date().toLocaleTimeString()}  ${msg}\n`;
  $("log").textContent = (line + $("log").textContent).slice(0, 8000);
}

function token() { return localStorage.getItem("makima-token") || ""; }
function authHeaders() { return token() ? { Authorization: `Bearer ${token()}` } : {}; }

async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(`${body.code || r.status}: ${body.message || r.statusText}`);
  return body;
}

async function loadInfo() {
  info = await api("/api/v1/info");
  $("model").textContent = info.model;
  $("noise").style.display = info.noise ? "block" : "none";
  $("auth-box").hidden = !info.auth_required;
  $("state").textContent = info.ready ? "ready" : info.error ? `load failed: ${info.error}` : `loading (${info.progress})`;
  $("state").className = info.error ? "bad" : "";
  const lang = $("language");
  if (lang.options.length <= 1) {
    for (const l of info.languages.filter((l) => l !== "auto")) lang.add(new Option(l, l));
  }
  if (!info.ready && !info.error) setTimeout(loadInfo, 1000);
  return info;
}

async function loadVoices(select) {
  const el = $("voice");
  if (info && info.speakers && info.speakers.length) {  // a CustomVoice model: its built-in speakers
    const keep = select || el.value || info.default_voice;
    el.innerHTML = "";
    for (const s of info.speakers) el.add(new Option(s, s));
    if (keep && info.speakers.includes(keep)) el.value = keep;
    return;
  }
  const { voices, default: def } = await api("/api/v1/voices");
  const keep = select || el.value || def;
  el.innerHTML = "";
  for (const v of voices) el.add(new Option(`${v.speaker} (${v.voice_id})`, v.voice_id));
  if (!voices.length) el.add(new Option("no voices yet: create one below", ""));
  if (keep && voices.some((v) => v.voice_id === keep)) el.value = keep;
}

// ---- playback --------------------------------------------------------------------------------
function ensurePlayer() {
  if (!player) {
    // 24 kHz context: the server's rate, so chunks play without resampling on our side.
    const ctx = new AudioContext({ sampleRate: info ? info.sample_rate : 24000 });
    player = { ctx, next: 0 };
  }
  player.ctx.resume();
  return player;
}

// Schedule one chunk; return when its first sample will be heard, on performance.now()'s clock.
function play(f32) {
  const p = ensurePlayer();
  const buf = p.ctx.createBuffer(1, f32.length, p.ctx.sampleRate);
  buf.copyToChannel(f32, 0);
  const src = p.ctx.createBufferSource();
  src.buffer = buf;
  src.connect(p.ctx.destination);
  // Gapless: each chunk starts exactly where the previous one ends, unless playback ran dry.
  const at = Math.max(p.next, p.ctx.currentTime + LEAD_S);
  src.start(at);
  p.next = at + buf.duration;
  stats.scheduledS += buf.duration;
  return heardAt(p.ctx, at);
}

// The context's clock → performance.now(). getOutputTimestamp pairs the context time now leaving the
// speakers with its performance time, so it includes the output latency; before the first render
// quantum it reads 0, so fall back to "now" plus the scheduling lead plus the reported output latency.
function heardAt(ctx, at) {
  const ts = ctx.getOutputTimestamp ? ctx.getOutputTimestamp() : {};
  if (ts.performanceTime > 0) return ts.performanceTime + (at - ts.contextTime) * 1000;
  return performance.now() + (at - ctx.currentTime + (ctx.outputLatency || 0)) * 1000;
}

function stopPlayback() {
  if (player) { player.ctx.close(); player = null; }
}

// ---- the session -----------------------------------------------------------------------------
function openSession(voice, language) {
  const key = `${voice}|${language}`;
  if (session && session.key === key && session.ws.readyState === WebSocket.OPEN) return session;
  if (session) session.ws.close();
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/v1/speak`;
  // Browsers cannot set headers on a WebSocket: the token travels as a second subprotocol.
  const protocols = token() ? [SUBPROTOCOL, `bearer.${token()}`] : [SUBPROTOCOL];
  const ws = new WebSocket(url, protocols);
  ws.binaryType = "arraybuffer";
  const s = { ws, key };
  s.ready = new Promise((resolve, reject) => {
    ws.onopen = () => ws.send(JSON.stringify({ type: "start", voice, language, encoding: "pcm_f32le" }));
    ws.onmessage = (ev) => onMessage(ev, resolve, reject);
    ws.onclose = (ev) => {
      if (session === s) session = null;
      reject(new Error(`connection closed (${ev.code}${ev.reason ? " " + ev.reason : ""})`));
      if (pending) finish();
    };
  });
  session = s;
  return s;
}

function onMessage(ev, resolve, reject) {
  if (typeof ev.data !== "string") {
    const f32 = new Float32Array(ev.data);
    stats.chunks += 1;
    stats.bytes += ev.data.byteLength;
    const arrived = performance.now();
    const heard = play(f32);
    if (pending && pending.firstAt === null) {
      // Measured to when it is heard, not when it arrived: what a listener waits for, and never below
      // the server's own figure (its interval lies inside this one).
      pending.firstAt = heard;
      stats.arrivalMs = arrived - pending.sentAt;
      stats.ttfaMs = heard - pending.sentAt;
      $("ttfa").textContent = `${Math.round(stats.ttfaMs)} ms`;
    }
    return;
  }
  const msg = JSON.parse(ev.data);
  if (msg.type === "ready") {
    log(`session ${msg.session_id}: voice ${msg.voice}, ${msg.sample_rate} Hz ${msg.encoding}`);
    resolve(msg);
  } else if (msg.type === "complete") {
    stats.completes += 1;
    stats.last = msg;
    $("server-ttfa").textContent = msg.ttfa_ms === null ? "–" : `${Math.round(msg.ttfa_ms)} ms`;
    $("audio").textContent = `${(msg.audio_ms / 1000).toFixed(2)} s`;
    $("rtf").textContent = msg.rtf === null ? "–" : msg.rtf.toFixed(3);
    log(`complete ${msg.id}: ${msg.frames} frames, ${msg.audio_ms} ms audio in ${msg.wall_ms} ms (${msg.stop_reason})`);
    finish();
  } else if (msg.type === "error") {
    stats.errors.push(msg);
    log(`error ${msg.code}: ${msg.message}`);
    if (!session || !pending || msg.id === undefined || msg.id === pending.id) reject(new Error(msg.message));
    if (pending && (msg.id === pending.id || msg.id === undefined)) finish();
  } else if (msg.type === "cancelled") {
    log(`cancelled ${msg.id}`);
    finish();
  }
}

function finish() {
  pending = null;
  $("speak").disabled = false;
  $("cancel").disabled = true;
}

async function speak() {
  const text = $("text").value.trim();
  const voice = $("voice").value;
  if (!text) return log("nothing to say");
  if (!voice) return log("pick or create a voice first");
  $("speak").disabled = true;
  $("cancel").disabled = false;
  ["ttfa", "server-ttfa", "audio", "rtf"].forEach((id) => ($(id).textContent = "…"));
  stats.ttfaMs = stats.arrivalMs = null;
  stopPlayback();
  ensurePlayer(); // created inside the click: browsers only start audio after a user gesture
  try {
    const s = openSession(voice, $("language").value);
    await s.ready;
    const id = `u${++utteranceSeq}`;
    pending = { id, sentAt: performance.now(), firstAt: null };
    s.ws.send(JSON.stringify({ type: "speak", id, text }));
  } catch (e) {
    log(`cannot speak: ${e.message}`);
    finish();
  }
}

function cancel() {
  if (session) session.ws.send(JSON.stringify({ type: "cancel" }));
  stopPlayback();
}

// ---- voices: upload or record ----------------------------------------------------------------
let recorder = null;

function wavFromFloat(chunks, rate) {
  const n = chunks.reduce((a, c) => a + c.length, 0);
  const view = new DataView(new ArrayBuffer(44 + n * 2));
  const str = (o, s) => [...s].forEach((ch, i) => view.setUint8(o + i, ch.charCodeAt(0)));
  str(0, "RIFF"); view.setUint32(4, 36 + n * 2, true); str(8, "WAVEfmt ");
  view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); str(36, "data"); view.setUint32(40, n * 2, true);
  let o = 44;
  for (const c of chunks) for (const x of c) { view.setInt16(o, Math.max(-1, Math.min(1, x)) * 32767, true); o += 2; }
  return new Blob([view], { type: "audio/wav" });
}

async function toggleRecord() {
  if (recorder) {
    const { ctx, stream, chunks, node } = recorder;
    node.disconnect();
    stream.getTracks().forEach((t) => t.stop());
    recorder = null;
    const blob = wavFromFloat(chunks, ctx.sampleRate);
    await ctx.close();
    recorder = null;
    window.makimaRecording = blob;
    $("record").textContent = "Record";
    $("rec-state").textContent = `recorded ${(blob.size / 2 / ctx.sampleRate).toFixed(1)} s`;
    return;
  }
  // MediaRecorder gives webm/opus, which libsndfile cannot read: capture raw samples, send WAV.
  const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
  const ctx = new AudioContext();
  const source = ctx.createMediaStreamSource(stream);
  const node = ctx.createScriptProcessor(4096, 1, 1);
  const chunks = [];
  node.onaudioprocess = (e) => chunks.push(new Float32Array(e.inputBuffer.getChannelData(0)));
  source.connect(node);
  node.connect(ctx.destination);
  recorder = { ctx, stream, chunks, node };
  window.makimaRecording = null;
  $("record").textContent = "Stop recording";
  $("rec-state").textContent = "recording…";
}

async function createVoice() {
  const file = $("clip").files[0] || window.makimaRecording;
  if (!file) return ($("create-state").textContent = "choose a clip or record one");
  const form = new FormData();
  form.append("audio", file, file.name || "recording.wav");
  form.append("name", $("voice-name").value.trim() || "my-voice");
  form.append("transcript", $("transcript").value.trim());
  form.append("x_vector_only", $("xvec").checked ? "true" : "false");
  $("create-state").textContent = "computing the voice prompt…";
  try {
    const v = await api("/api/v1/voices", { method: "POST", body: form });
    $("create-state").textContent = `created ${v.voice_id}`;
    await loadVoices(v.voice_id);
    log(`voice ${v.voice_id} created (${v.duration_s} s reference)`);
  } catch (e) {
    $("create-state").textContent = e.message;
  }
}

// ---- wiring ----------------------------------------------------------------------------------
$("speak").onclick = speak;
$("cancel").onclick = cancel;
$("record").onclick = () => toggleRecord().catch((e) => ($("rec-state").textContent = e.message));
$("create").onclick = createVoice;
$("save-token").onclick = () => {
  localStorage.setItem("makima-token", $("token").value.trim());
  loadVoices().then(() => log("token accepted"), (e) => log(e.message));
};
$("token").value = token();
loadInfo()
  .then(() => loadVoices())
  .then(() => (window.makimaPageReady = true))
  .catch((e) => log(e.message));
