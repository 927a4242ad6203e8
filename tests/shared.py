"""Where the repository and the files shared beside it (``../shared``: real tokenizers, ControlNet images, the
ComfyUI checkout) are; the one place tests build these paths."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
TOKENIZERS = os.path.join(SHARED, "tokenizers")
IMAGES = os.path.join(SHARED, "images")
