"""Inference: how the next token is chosen (`sampling`), text out of tokens with stop strings
(`stream`), one decoder interface over the model and its KV cache (`decoder`), generation
(`generate`) and continuous batching for the server (`engine`)."""
