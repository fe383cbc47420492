// omniframe's browser page: talk to a served pipeline over the OpenAI Realtime API.
//
// microphone -> capture worklet (24 kHz PCM16, 20 ms) -> input_audio_buffer.append; the
// server's VAD finds the turns; response.output_audio.delta -> playback worklet (a ring
// buffer). Barge-in: on input_audio_buffer.speech_started the page drops what it has queued
// and sends conversation.item.truncate with what was actually played. Voice-to-voice latency
// is measured here: from the end of the user's speech (the speech_stopped event's
// audio_end_ms, mapped back to the moment that sample was captured) to the moment the
// answer's first sample played (plus the output latency the browser reports).
//
// window.omniframe exposes the page's state for tests and diagnostics; with ?record=1 in the
// URL it also keeps the audio the player played (omniframe.playedBase64(item)).
// Other URL parameters: ?model=NAME preselects a served pipeline, ?rate=native (see start()).

const RATE = 24000;
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/; // what a subprotocol may carry

const hook = {
  state: "idle",
  events: [], // server events, audio left out
  sent: [], // client events other than appends
  appended: 0, // input samples sent
  turns: [], // {item, response, voice_to_voice_ms, first_delta_ms}
  received: {}, // assistant item -> samples received
  playedBy: {}, // assistant item -> samples played
  played: {}, // assistant item -> [Int16Array] (with ?record=1)
  errors: [],
  closed: null,
  sampleRate: null,
  playedBase64(item) {
    const parts = this.played[item] || [];
    const n = parts.reduce((a, p) => a + p.length, 0);
    const all = new Int16Array(n);
    let o = 0;
    for (const p of parts) {
      all.set(p, o);
      o += p.length;
    }
    return toBase64(new Uint8Array(all.buffer));
  },
};
window.omniframe = hook;

let ws = null;
let ctx = null;
let media = null;
let capture = null;
let player = null;
let stopping = false;
let opened = false;
let chunkTimes = []; // [end sample, performance.now()] per captured chunk
let pendingTurn = null; // the last turn whose speech ended: {item, endT}
const responses = new Map(); // response id -> {id, turn, firstDeltaT, v2v, flushed}
const itemResponse = new Map(); // assistant item -> response id
const truncated = new Set();
const lines = new Map(); // item -> {li, text, meta}
const latencies = [];
let run = 0; // each start() and stop() begins a new run: late callbacks of an old one quit
let clearSeq = 0;
const clearWaiters = new Map();

// ------------------------------------------------------------------ helpers

function toBase64(u8) {
  let s = "";
  for (let i = 0; i < u8.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, u8.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

function fromBase64(b64) {
  const s = atob(b64);
  const u8 = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) u8[i] = s.charCodeAt(i);
  return u8.buffer;
}

function setState(state, text) {
  hook.state = state;
  const el = $("status");
  el.textContent = text || state;
  el.className = `status ${state}`;
  $("talk").textContent = state === "idle" ? "Start talking" : "Stop";
}

function showError(message) {
  hook.errors.push(message);
  const el = $("error");
  el.textContent = message;
  el.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function send(event) {
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  if (event.type !== "input_audio_buffer.append") hook.sent.push(event);
  ws.send(JSON.stringify(event));
}

// when the input sample at `ms` was captured (performance.now() time)
function captureTime(ms) {
  const s = (ms * RATE) / 1000;
  let lo = 0;
  let hi = chunkTimes.length - 1;
  if (hi < 0) return performance.now();
  if (chunkTimes[hi][0] < s) return chunkTimes[hi][1] + ((s - chunkTimes[hi][0]) * 1000) / RATE;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (chunkTimes[mid][0] >= s) hi = mid;
    else lo = mid + 1;
  }
  const [end, t] = chunkTimes[lo];
  return t - ((end - s) * 1000) / RATE;
}

function fmtMs(ms) {
  return ms == null ? "–" : `${Math.round(ms)} ms`;
}

// ------------------------------------------------------------------ transcript

function line(item, who) {
  let l = lines.get(item);
  if (l) return l;
  const li = document.createElement("li");
  li.className = who;
  li.dataset.item = item;
  const w = document.createElement("span");
  w.className = "who";
  w.textContent = who === "user" ? "You" : "Assistant";
  const text = document.createElement("span");
  text.className = "text";
  const meta = document.createElement("span");
  meta.className = "meta";
  li.append(w, text, meta);
  $("transcript").append(li);
  li.scrollIntoView({ block: "nearest" });
  l = { li, text, meta };
  lines.set(item, l);
  return l;
}

function showLatency(r, item) {
  latencies.push(r.v2v);
  const sorted = [...latencies].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  const median = sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
  $("v2v-last").textContent = fmtMs(r.v2v);
  $("v2v-median").textContent = fmtMs(median);
  $("v2v-n").textContent = String(latencies.length);
  const l = line(item, "assistant");
  l.meta.textContent = `voice-to-voice ${fmtMs(r.v2v)}`;
  l.meta.title = "end of your speech -> first audio played (first audio received after " +
    `${fmtMs(r.firstDeltaT - r.turn.endT)})`;
}

// ------------------------------------------------------------------ player and barge-in

function onPlayer(e) {
  const m = e.data;
  if (m.type === "start") {
    const r = responses.get(itemResponse.get(m.item));
    if (r && r.turn && r.v2v == null) {
      const out = ((ctx && (ctx.outputLatency || ctx.baseLatency)) || 0) * 1000;
      r.v2v = performance.now() + out - r.turn.endT;
      hook.turns.push({ item: m.item, response: r.id, voice_to_voice_ms: r.v2v,
        first_delta_ms: r.firstDeltaT - r.turn.endT });
      showLatency(r, m.item);
    }
  } else if (m.type === "progress" || m.type === "idle") {
    if (m.item) hook.playedBy[m.item] = m.itemPlayed;
    if (m.type === "idle" && hook.state === "answering") setState("listening", "listening");
  } else if (m.type === "played") {
    (hook.played[m.item] ||= []).push(new Int16Array(m.pcm));
  } else if (m.type === "cleared") {
    Object.assign(hook.playedBy, m.played);
    const done = clearWaiters.get(m.id);
    clearWaiters.delete(m.id);
    if (done) done(m);
  }
}

function clearPlayer() {
  return new Promise((resolve) => {
    const id = ++clearSeq;
    clearWaiters.set(id, resolve);
    player.port.postMessage({ type: "clear", id });
  });
}

async function bargeIn() {
  if (!player) return;
  const unheard = Object.keys(hook.received).filter((item) => !truncated.has(item) &&
    (hook.playedBy[item] || 0) < hook.received[item]);
  if (unheard.length === 0) return; // nothing queued: nothing to interrupt
  for (const item of unheard) {
    const r = responses.get(itemResponse.get(item));
    if (r) r.flushed = true; // what still comes of these answers is not played
  }
  const cleared = await clearPlayer();
  for (const item of unheard) {
    const played = cleared.played[item] || 0;
    if (played >= hook.received[item]) continue; // it had ended before the clear
    truncated.add(item);
    const audioEndMs = Math.floor((played * 1000) / RATE);
    send({ type: "conversation.item.truncate", item_id: item, content_index: 0,
      audio_end_ms: audioEndMs });
    line(item, "assistant").li.classList.add("interrupted");
  }
}

// ------------------------------------------------------------------ server events

function onEvent(msg) {
  let e;
  try {
    e = JSON.parse(msg.data);
  } catch {
    showError("the server sent something that is not JSON");
    return;
  }
  const rec = { type: e.type, t: performance.now() };
  for (const k of ["item_id", "response_id", "audio_end_ms", "audio_start_ms", "transcript"]) {
    if (k in e) rec[k] = e[k];
  }
  if (e.response) rec.response = { id: e.response.id, status: e.response.status,
    status_details: e.response.status_details };
  if (e.error) rec.error = e.error;
  hook.events.push(rec);

  switch (e.type) {
    case "session.created":
      send({ type: "session.update", session: { type: "realtime",
        audio: { input: { transcription: { model: "whisper-1" } } } } });
      {
        const mine = run;
        startMic().catch((err) => {
          if (mine === run) fail(`microphone: ${err.message || err}`);
        });
      }
      break;
    case "input_audio_buffer.speech_started":
      line(e.item_id, "user").text.textContent = "…";
      setState("hearing", "hearing you");
      bargeIn();
      break;
    case "input_audio_buffer.speech_stopped":
      pendingTurn = { item: e.item_id, endT: captureTime(e.audio_end_ms) };
      setState("thinking", "thinking");
      break;
    case "conversation.item.input_audio_transcription.completed":
      line(e.item_id, "user").text.textContent = e.transcript;
      break;
    case "response.created":
      responses.set(e.response.id, { id: e.response.id, turn: pendingTurn, firstDeltaT: null,
        v2v: null, flushed: false });
      pendingTurn = null;
      break;
    case "response.output_item.added":
      if (e.item && e.item.type === "message") {
        itemResponse.set(e.item.id, e.response_id);
        line(e.item.id, "assistant");
      }
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta": {
      itemResponse.set(e.item_id, e.response_id);
      line(e.item_id, "assistant").text.textContent += e.delta;
      break;
    }
    case "response.output_audio.delta": {
      const r = responses.get(e.response_id);
      if (!r || r.flushed || !player) break;
      if (r.firstDeltaT == null) r.firstDeltaT = performance.now();
      itemResponse.set(e.item_id, e.response_id);
      const pcm = fromBase64(e.delta);
      hook.received[e.item_id] = (hook.received[e.item_id] || 0) + pcm.byteLength / 2;
      player.port.postMessage({ type: "audio", item: e.item_id, pcm }, [pcm]);
      if (hook.state !== "hearing") setState("answering", "answering");
      break;
    }
    case "response.done": {
      const st = e.response.status;
      if (st !== "completed") {
        for (const out of e.response.output || []) {
          const l = lines.get(out.id);
          if (l) l.li.classList.add(st);
        }
      }
      if (hook.state === "thinking") setState("listening", "listening");
      break;
    }
    case "conversation.item.truncated": {
      const l = line(e.item_id, "assistant");
      l.meta.textContent += ` · heard ${(e.audio_end_ms / 1000).toFixed(1)} s`;
      break;
    }
    case "error":
      showError(`server: ${e.error.message} (${e.error.code || e.error.type})`);
      break;
    default:
      break;
  }
}

// ------------------------------------------------------------------ start / stop

async function startMic() {
  const mine = run;
  const aec = $("aec").checked;
  const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1,
    echoCancellation: aec, noiseSuppression: aec, autoGainControl: aec } });
  if (mine !== run) { // stopped while the browser asked for the microphone
    for (const t of stream.getTracks()) t.stop();
    return;
  }
  media = stream;
  let source;
  try {
    source = ctx.createMediaStreamSource(media);
  } catch (err) {
    // Firefox cannot connect a microphone to a context at another rate: run at the
    // device's rate, the worklets convert
    if (err.name !== "NotSupportedError") throw err;
    await ctx.close();
    ctx = new AudioContext();
    await ctx.resume();
    await setupPlayer();
    source = ctx.createMediaStreamSource(media);
  }
  await ctx.audioWorklet.addModule("/static/capture-worklet.js");
  if (mine !== run) return;
  capture = new AudioWorkletNode(ctx, "omniframe-capture", { numberOfOutputs: 0 });
  capture.port.onmessage = (ev) => {
    const m = ev.data;
    if (m.type !== "chunk" || !ws || ws.readyState !== WebSocket.OPEN) return;
    const pcm = new Uint8Array(m.pcm);
    send({ type: "input_audio_buffer.append", audio: toBase64(pcm) });
    hook.appended += pcm.length / 2;
    chunkTimes.push([hook.appended, performance.now()]);
    if (chunkTimes.length > 60000) chunkTimes = chunkTimes.slice(-30000);
    $("level").style.width = `${Math.min(100, Math.round(m.peak * 100))}%`;
  };
  source.connect(capture);
  hook.sampleRate = ctx.sampleRate;
  setState("listening", "listening");
}

async function setupPlayer() {
  await ctx.audioWorklet.addModule("/static/playback-worklet.js");
  player = new AudioWorkletNode(ctx, "omniframe-playback", { numberOfInputs: 0,
    numberOfOutputs: 1, outputChannelCount: [1] });
  player.port.onmessage = onPlayer;
  if (params.get("record") === "1") player.port.postMessage({ type: "record", on: true });
  player.connect(ctx.destination);
}

function fail(message) {
  showError(message);
  stop();
}

async function start() {
  clearError();
  const model = $("model").value;
  const key = $("key").value.trim();
  if (key && !TOKEN.test(key)) {
    showError("this API key has characters a WebSocket subprotocol cannot carry");
    return;
  }
  if (!window.AudioWorkletNode || !navigator.mediaDevices) {
    showError("this browser needs a secure context (https, or http://localhost) for the " +
      "microphone and AudioWorklet");
    return;
  }
  stopping = false;
  opened = false;
  const mine = ++run;
  setState("connecting", "connecting");
  // created in the click, so it may play; ?rate=native runs at the device's rate (the
  // worklets then convert, as they do where a 24 kHz context cannot take a microphone)
  ctx = params.get("rate") === "native" ? new AudioContext()
    : new AudioContext({ sampleRate: RATE });
  try {
    await ctx.resume();
    await setupPlayer();
  } catch (err) {
    if (mine === run) fail(`audio: ${err.message || err}`);
    return;
  }
  if (mine !== run) return; // stopped meanwhile
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url = `${scheme}://${location.host}/v1/realtime?model=${encodeURIComponent(model)}`;
  const protocols = ["realtime"];
  if (key) protocols.push(`openai-insecure-api-key.${key}`);
  ws = new WebSocket(url, protocols);
  ws.onopen = () => {
    opened = true;
  };
  ws.onmessage = onEvent;
  ws.onclose = (ev) => {
    if (mine !== run) return; // a socket this page already left
    hook.closed = { code: ev.code, reason: ev.reason };
    if (!stopping) {
      if (!opened) {
        showError("could not open a session: a wrong or missing API key, an Origin the " +
          "server does not allow, or the server is down (its log says which)");
      } else {
        showError(`the server ended the session: ${ev.reason || "no reason"} (${ev.code})`);
      }
    }
    stop();
  };
}

function stop() {
  run++;
  stopping = true;
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, "client stopped");
  ws = null;
  if (media) for (const t of media.getTracks()) t.stop();
  media = null;
  if (capture) capture.port.postMessage({ type: "stop" });
  capture = null;
  player = null;
  if (ctx) ctx.close();
  ctx = null;
  chunkTimes = [];
  hook.appended = 0;
  pendingTurn = null;
  setState("idle", "idle");
}

// ------------------------------------------------------------------ served pipelines

async function loadModels() {
  const key = $("key").value.trim();
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  let res;
  try {
    res = await fetch("/v1/models", { headers });
  } catch (err) {
    $("model-desc").textContent = `cannot reach the server: ${err.message || err}`;
    return;
  }
  if (res.status === 401) {
    $("model-desc").textContent = "this server needs an API key: enter it above";
    return;
  }
  const body = await res.json();
  const select = $("model");
  const want = select.value || params.get("model");
  select.replaceChildren();
  for (const m of body.data) {
    const opt = document.createElement("option");
    opt.value = m.id;
    opt.textContent = m.id;
    opt.title = m.description || "";
    select.append(opt);
  }
  if (want && body.data.some((m) => m.id === want)) select.value = want;
  describe();
  hook.models = body.data.map((m) => m.id);
}

function describe() {
  const opt = $("model").selectedOptions[0];
  $("model-desc").textContent = opt ? opt.title : "";
}

$("talk").addEventListener("click", () => (hook.state === "idle" ? start() : stop()));
$("model").addEventListener("change", describe);
$("key").addEventListener("change", loadModels);
loadModels();
