"""Running a model: the generation loop, the Decoder interface over it (eager or compiled), and GGUF files
in llama.cpp. Serving and speculative decoding build on `runtime.decoder`."""
