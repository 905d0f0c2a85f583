"""The embedded default model: mel front end, MiniLM text encoder, a small StableAudioDiTModel."""
