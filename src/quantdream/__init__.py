"""quantdream: personalize text-to-image diffusion models on quantized weights."""
__version__ = "0.3.0"
