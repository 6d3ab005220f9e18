"""Self-contained PyTorch modeling files copied next to an exported ``lckv-llama`` model.

``kvshare convert --to-hf`` writes ``configuration_kvshare.py`` and ``modeling_kvshare.py``
beside ``config.json`` (whose ``auto_map`` names them), so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads the model
with kvshare_jax's exact semantics. Importing them needs torch and transformers.
"""

import os

FILES = ("configuration_kvshare.py", "modeling_kvshare.py")
AUTO_MAP = {
    "AutoConfig": "configuration_kvshare.KVShareConfig",
    "AutoModelForCausalLM": "modeling_kvshare.KVShareForCausalLM",
}


def paths() -> list[str]:
    """Absolute paths of the modeling files to ship with an export."""
    here = os.path.dirname(os.path.abspath(__file__))
    return [os.path.join(here, name) for name in FILES]
