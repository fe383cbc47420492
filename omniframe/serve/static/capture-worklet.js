// omniframe: the microphone's AudioWorklet. Mixes the input to mono, converts it to 24 kHz
// (a linear resampler, used only where the AudioContext could not run at 24 kHz, e.g.
// Firefox) and posts 20 ms chunks of PCM16 (480 samples) to the page, transferring each buffer.

const OUT_RATE = 24000;
const CHUNK = 480;

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / OUT_RATE; // input samples per output sample
    this.pos = 0; // next output sample's position in the current block (-1: the previous one)
    this.prev = 0; // the previous block's last sample
    this.buf = new Int16Array(CHUNK);
    this.n = 0;
    this.peak = 0;
    this.running = true;
    this.port.onmessage = (e) => {
      if (e.data && e.data.type === "stop") this.running = false;
    };
  }

  push(v) {
    const s = v > 1 ? 1 : v < -1 ? -1 : v;
    const a = s < 0 ? -s : s;
    if (a > this.peak) this.peak = a;
    this.buf[this.n++] = s < 0 ? s * 0x8000 : s * 0x7fff;
    if (this.n === CHUNK) {
      this.port.postMessage({ type: "chunk", pcm: this.buf.buffer, peak: this.peak },
        [this.buf.buffer]);
      this.buf = new Int16Array(CHUNK);
      this.n = 0;
      this.peak = 0;
    }
  }

  process(inputs) {
    if (!this.running) return false;
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true; // nothing connected (yet)
    const n = channels[0].length;
    let x = channels[0];
    if (channels.length > 1) {
      x = new Float32Array(n);
      for (const ch of channels) for (let i = 0; i < n; i++) x[i] += ch[i] / channels.length;
    }
    if (this.step === 1) {
      for (let i = 0; i < n; i++) this.push(x[i]);
      return true;
    }
    while (this.pos < n - 1) {
      const i = Math.floor(this.pos);
      const f = this.pos - i;
      const a = i < 0 ? this.prev : x[i];
      this.push(a + (x[i + 1] - a) * f);
      this.pos += this.step;
    }
    this.pos -= n;
    this.prev = x[n - 1];
    return true;
  }
}

registerProcessor("omniframe-capture", CaptureProcessor);
