"""ctxext: extend the context window of Hugging Face causal LMs by rewriting their rotary embedding.

``import ctxext`` registers the attention-side methods (``ctxext_xpos``, ``ctxext_selfextend``) with transformers
as soon as transformers' modeling code is imported (at once if it already is), so checkpoints patched with them
load with stock ``AutoModelForCausalLM.from_pretrained``. Importing ctxext imports neither transformers nor the
layers above ``ctxext.rope``: ``import ctxext.rope`` needs only torch, and the names below load on first use.

Layers, lowest first (each imports only the ones before it; ARCHITECTURE.md): ``rope`` -> ``models`` -> ``io``
-> ``patch`` -> ``data`` -> ``train`` -> ``evals`` -> ``longrope`` -> ``experiments`` -> ``cli``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_PUBLIC = {
    "CtxextError": "ctxext.errors",
    "MethodError": "ctxext.errors",
    "METHODS": "ctxext.rope",
    "make_method": "ctxext.rope",
    "parse_chain": "ctxext.rope",
    "register_method": "ctxext.rope",
    "PatchHandle": "ctxext.patch",
    "PatchPlan": "ctxext.patch",
    "patch_model": "ctxext.patch",
    "plan_patch": "ctxext.patch",
    "register_with_transformers": "ctxext.models.attention",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'ctxext' has no attribute {name!r}")


_TRIGGER = "transformers.modeling_utils"  # holds AttentionInterface; imported before any model is built


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``register_with_transformers`` right after transformers' modeling code is first imported, so that
    ``import ctxext`` itself stays light. Leaves ``sys.meta_path`` once it has fired."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRIGGER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # whichever finder would have found it
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def _register() -> None:
    from ctxext.models.attention import register_with_transformers

    register_with_transformers()


if _TRIGGER in sys.modules:
    _register()
elif importlib.util.find_spec("transformers") is not None:  # without transformers, ctxext.rope still works
    sys.meta_path.insert(0, _RegisterAfterImport())
