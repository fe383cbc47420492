"""Echo stages: a torch-free LM and codec, so the whole chain runs and is tested anywhere."""
