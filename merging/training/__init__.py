"""Training maths (no ComfyUI): timestep sampling for range experts and the optimiser schedules (``schedules``)."""
