"""Hugging Face integration (the `hf` extra: `pip install openmythos[hf]`).

Importing this package registers OpenMythos with `AutoConfig` and `AutoModelForCausalLM`
(model_type "openmythos"). Directories written by `save_hf`/`export_hf` (or by
`OpenMythosForCausalLM.save_pretrained`) also load without it, through
`trust_remote_code=True`, as they carry their own copy of the model code.
"""

try:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError("openmythos.hf needs transformers: pip install 'openmythos[hf]'") from e
from packaging.version import Version

from openmythos.hf.callbacks import RouterBiasCallback
from openmythos.hf.configuration_openmythos import OpenMythosHFConfig
from openmythos.hf.export import export_hf, load_pretrained, save_hf, to_hf_tokenizer
from openmythos.hf.modeling_openmythos import (
    OpenMythosCache,
    OpenMythosCausalLMOutput,
    OpenMythosForCausalLM,
)

# older releases take any cache that is not their own Cache class for a legacy tuple
MIN_TRANSFORMERS = "4.55"
if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):  # pragma: no cover
    raise ImportError(f"openmythos.hf needs transformers>={MIN_TRANSFORMERS}, found "
                      f"{transformers.__version__}: pip install -U 'openmythos[hf]'")

AutoConfig.register(OpenMythosHFConfig.model_type, OpenMythosHFConfig, exist_ok=True)
AutoModelForCausalLM.register(OpenMythosHFConfig, OpenMythosForCausalLM, exist_ok=True)
# save_pretrained then writes config.json's auto_map and copies the two transformers-facing
# files; the model's save_pretrained adds the core model code they import
OpenMythosHFConfig.register_for_auto_class()
OpenMythosForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "MIN_TRANSFORMERS",
    "OpenMythosCache",
    "OpenMythosCausalLMOutput",
    "OpenMythosForCausalLM",
    "OpenMythosHFConfig",
    "RouterBiasCallback",
    "export_hf",
    "load_pretrained",
    "save_hf",
    "to_hf_tokenizer",
]
