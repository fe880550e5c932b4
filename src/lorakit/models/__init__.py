"""Models: loading a Hugging Face directory or GGUF file with its linear layers in NF4
(`loading`), chat templates and the pad id (`chat`), compute precision (`precision`), folding
an adapter into a full-precision base (`merge`), and training's faster forwards for
transformers' modules (`patches`, `packed_attention`), applied in a context that undoes them."""
