"""Sampling maths (no ComfyUI): σ schedules and expert boundaries for routing (``schedules``) and SuperDiff's
superposition of diffusion models with the Itô density estimator (``superdiff``)."""
