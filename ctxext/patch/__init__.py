"""Patch layer: apply a method chain to a live model (``model``) or to a checkpoint on disk (``checkpoint``)."""

from ctxext.patch.model import PatchHandle, PatchPlan, apply_plan, patch_model, plan_patch

__all__ = ["PatchHandle", "PatchPlan", "apply_plan", "patch_model", "plan_patch"]
