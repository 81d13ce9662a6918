"""Built-in plugins. Importing them silences library warnings a person can't act on (CLIP's
77-token cut of every IC prompt, torchao's optional kernels); diffusers and transformers read
their verbosity variables when first imported, which happens later, inside the plugins."""

import logging
import os

for _name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
    os.environ.setdefault(_name, "error")
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
