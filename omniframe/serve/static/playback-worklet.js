// omniframe: the answer's player, an AudioWorklet ring buffer of 24 kHz PCM.
//
// The page posts {type: "audio", item, pcm} (an ArrayBuffer of Int16), and {type: "clear",
// id} on barge-in: everything queued is dropped at once and the answer is {type: "cleared",
// id, played: {item: samples}, dropped}, so the page knows how much of each item was heard
// (conversation.item.truncate's audio_end_ms). While playing it reports {type: "start", item}
// when an item's first sample plays, {type: "progress", ...} every 100 ms and {type: "idle"}
// when the queue runs dry. With {type: "record", on: true} it also posts what it played
// ({type: "played", item, pcm}), for tests and diagnostics.

const IN_RATE = 24000;
const REPORT = 2400; // samples between progress reports (100 ms)

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = IN_RATE / sampleRate; // source samples per output sample (1 at 24 kHz)
    this.queue = []; // {pcm: Float32Array, item, off}
    this.queued = 0;
    this.played = 0;
    this.dropped = 0;
    this.playedBy = new Map(); // item -> source samples played
    this.phase = 1; // >= 1: take the next source sample first
    this.a = 0; // resampling: the last two source samples
    this.b = 0;
    this.current = null;
    this.sinceReport = 0;
    this.playing = false;
    this.record = false;
    this.rec = null; // {item, pcm: Int16Array, n}
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(m) {
    if (m.type === "audio") {
      const pcm = new Int16Array(m.pcm);
      const f = new Float32Array(pcm.length);
      for (let i = 0; i < pcm.length; i++) f[i] = pcm[i] / 32768;
      this.queue.push({ pcm: f, item: m.item, off: 0 });
      this.queued += f.length;
    } else if (m.type === "clear") {
      this.dropped += this.queued;
      const dropped = this.queued;
      this.queue = [];
      this.queued = 0;
      this.flushRecord();
      this.playing = false;
      this.port.postMessage({ type: "cleared", id: m.id, dropped,
        played: Object.fromEntries(this.playedBy), current: this.current });
    } else if (m.type === "record") {
      this.record = !!m.on;
    }
  }

  // the next source sample, or null on underrun
  next() {
    while (this.queue.length) {
      const head = this.queue[0];
      if (head.off < head.pcm.length) {
        const item = head.item;
        if (item !== this.current) {
          this.flushRecord();
          this.current = item;
          this.playedBy.set(item, 0);
          if (this.playedBy.size > 64) this.playedBy.delete(this.playedBy.keys().next().value);
          this.port.postMessage({ type: "start", item });
        }
        const v = head.pcm[head.off++];
        this.queued--;
        this.played++;
        this.playedBy.set(item, this.playedBy.get(item) + 1);
        if (this.record) this.keep(item, v);
        return v;
      }
      this.queue.shift();
    }
    return null;
  }

  keep(item, v) {
    if (this.rec === null || this.rec.n === this.rec.pcm.length) {
      this.flushRecord();
      this.rec = { item, pcm: new Int16Array(REPORT), n: 0 };
    }
    this.rec.pcm[this.rec.n++] = Math.max(-32768, Math.min(32767, Math.round(v * 32768)));
  }

  flushRecord() {
    const r = this.rec;
    this.rec = null;
    if (r === null || r.n === 0) return;
    const pcm = r.pcm.slice(0, r.n);
    this.port.postMessage({ type: "played", item: r.item, pcm: pcm.buffer }, [pcm.buffer]);
  }

  process(inputs, outputs) {
    const out = outputs[0];
    const L = out[0].length;
    const x = out[0];
    let got = 0;
    if (this.step === 1) {
      for (let i = 0; i < L; i++) {
        const v = this.next();
        if (v === null) break;
        x[i] = v;
        got++;
      }
    } else {
      for (let i = 0; i < L; i++) {
        while (this.phase >= 1) {
          const v = this.next();
          if (v === null) break;
          this.a = this.b;
          this.b = v;
          this.phase -= 1;
        }
        if (this.phase >= 1) break; // underrun
        x[i] = this.a + (this.b - this.a) * this.phase;
        this.phase += this.step;
        got++;
      }
    }
    for (let c = 1; c < out.length; c++) out[c].set(x);
    if (got > 0) {
      this.playing = true;
      this.sinceReport += got;
      if (this.sinceReport >= REPORT) {
        this.sinceReport = 0;
        this.port.postMessage({ type: "progress", item: this.current, queued: this.queued,
          played: this.played, itemPlayed: this.playedBy.get(this.current) || 0 });
      }
    }
    if (this.playing && this.queued === 0) {
      this.playing = false;
      this.flushRecord();
      this.port.postMessage({ type: "idle", item: this.current, played: this.played,
        itemPlayed: this.playedBy.get(this.current) || 0 });
    }
    return true;
  }
}

registerProcessor("omniframe-playback", PlaybackProcessor);
