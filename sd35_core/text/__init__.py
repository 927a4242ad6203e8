"""From a prompt to conditioning: the CLIP and T5 tokenizers (with prompt weights) and the SD3 text encoder that runs
CLIP-L, CLIP-G and T5."""
