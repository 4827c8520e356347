"""Whole experiments: recipes (extend, fine-tune, evaluate), the demo, sweeps, and the reference encodings."""
