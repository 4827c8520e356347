"""ctxext: extend the context window of Hugging Face causal LMs by rewriting their rotary embedding.

``import ctxext`` registers the ``ctxext_xpos`` rope type and attention function with transformers, so
checkpoints patched with xPos load with stock ``AutoModelForCausalLM.from_pretrained``.
"""

__version__ = "0.1.0"

from .models import xpos_attention as _xpos_attention  # noqa: E402,F401  (registration with transformers)
from .patch import PatchHandle, PatchPlan, patch_model, plan_patch  # noqa: E402
from .rope import METHODS, MethodError, make_method, parse_chain  # noqa: E402

__all__ = ["METHODS", "MethodError", "PatchHandle", "PatchPlan", "make_method", "parse_chain", "patch_model", "plan_patch"]
