#!/usr/bin/env python3
"""Write a short spoken question as a wav file with espeak-ng (for the README's main command).

    python scripts/make_question.py examples/question.wav
    python scripts/make_question.py q.wav --text "How many legs does a spider have?" --voice en-gb

Output: 16 kHz mono 16-bit PCM with a little silence around the speech, the way a recording
of a person asking would look. Needs espeak-ng (apt-get install -y espeak-ng).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_TEXT = "What is the capital of France?"


def make_question(path: Path, text: str = DEFAULT_TEXT, voice: str = "en-us", rate: int = 175,
                  sample_rate: int = 16000, pad_s: float = 0.3) -> float:
    """Speak ``text`` into ``path``; returns the duration in seconds."""
    import numpy as np
    import soundfile as sf

    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe is None:
        raise SystemExit("make_question: espeak-ng is not installed: apt-get install -y espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "q.wav"
        proc = subprocess.run([exe, "-v", voice, "-s", str(rate), "-w", str(raw)],
                              input=text.encode(), capture_output=True, check=False)
        if proc.returncode != 0 or not raw.exists():
            raise SystemExit(f"make_question: espeak-ng failed: "
                             f"{proc.stderr.decode(errors='replace').strip()}")
        data, sr = sf.read(raw, dtype="float32", always_2d=False)
    if data.ndim > 1:
        data = data.mean(axis=1)
    if sr != sample_rate:
        from scipy.signal import resample_poly

        g = np.gcd(sr, sample_rate)
        data = resample_poly(data, sample_rate // g, sr // g).astype(np.float32)
    pad = np.zeros(int(pad_s * sample_rate), dtype=np.float32)
    data = np.concatenate([pad, data, pad])
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, sample_rate, subtype="PCM_16")
    return len(data) / sample_rate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path, help="the wav file to write")
    ap.add_argument("--text", default=DEFAULT_TEXT, help=f"what to ask (default: {DEFAULT_TEXT!r})")
    ap.add_argument("--voice", default="en-us", help="espeak-ng voice (espeak-ng --voices)")
    ap.add_argument("--rate", type=int, default=175, help="words per minute")
    ap.add_argument("--sample-rate", type=int, default=16000)
    args = ap.parse_args(argv)
    seconds = make_question(args.path, args.text, args.voice, args.rate, args.sample_rate)
    print(f"wrote {args.path} ({seconds:.1f} s): {args.text!r}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
