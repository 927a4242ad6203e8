"""``sd35 generate``: a drop-in for Stability's ``sd3_infer.py``, running on sd35_core.

Same option names, meanings, per-model defaults and output folder naming as the reference's ``main()``, so a
reference command line works unchanged; see :data:`~.options.DESCRIPTION` for where we deliberately differ.
:func:`generate` is the one code path from files to PNGs: the demo calls it too.

- :mod:`.options`: argument parsing, the reference-compatible option names and defaults, checks;
- :mod:`.settings`: per-model defaults resolved under the options;
- :mod:`.models`: device choice and model loading;
- :mod:`.images`: init / control images in, decoded images out;
- :mod:`.generation`: the run (prompts, seeds, conditioning, one ``SampleRequest`` per image, sampling);
- :mod:`.output`: output folder naming and the run's result; :mod:`.progress`: progress bar, peak memory.
"""

from .generation import generate, read_prompts, run, seeds_for
from .models import LoadedModels, load_models
from .options import DESCRIPTION, HELP, GenerateOptions, add_arguments, options_from_args, validate_options
from .output import GenerateResult, output_dir
from .settings import Settings, resolve_settings

__all__ = [
    "DESCRIPTION",
    "HELP",
    "GenerateOptions",
    "GenerateResult",
    "LoadedModels",
    "Settings",
    "add_arguments",
    "generate",
    "load_models",
    "options_from_args",
    "output_dir",
    "read_prompts",
    "resolve_settings",
    "run",
    "seeds_for",
    "validate_options",
]
