"""omniframe_audio: audio in and out, and voice activity detection.

Stages (``kind: plugin``):

* sources: ``file`` (wav/flac/ogg, one file or a list; optional real-time pacing),
  ``synth`` (a speech-like test signal), ``mic`` (sounddevice);
* vads: ``energy``, ``silero`` (the model shipped in silero-vad), ``webrtc`` (webrtcvad-wheels);
* sinks: ``wav`` (incremental, valid even if the run is killed), ``text`` (stdout or JSONL),
  ``null``, ``speaker`` (sounddevice).
"""
