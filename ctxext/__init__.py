"""ctxext: extend the context window of Hugging Face causal LMs by rewriting their rotary embedding.

``import ctxext`` registers the attention-side methods (``ctxext_xpos``) with transformers, so checkpoints
patched with them load with stock ``AutoModelForCausalLM.from_pretrained``. ``ctxext.rope`` alone needs only
torch.
"""

__version__ = "0.1.0"

from .errors import CtxextError, MethodError
from .models.attention import register_with_transformers
from .patch import PatchHandle, PatchPlan, patch_model, plan_patch
from .rope import METHODS, make_method, parse_chain, register_method

try:
    import transformers  # noqa: F401
except ImportError:  # ctxext.rope (pure torch) still works; patching and loading need transformers
    pass
else:
    register_with_transformers()

__all__ = [
    "METHODS",
    "CtxextError",
    "MethodError",
    "PatchHandle",
    "PatchPlan",
    "make_method",
    "parse_chain",
    "patch_model",
    "plan_patch",
    "register_method",
    "register_with_transformers",
]
