"""Quantization engine: low-bit Linear/Conv2d, trainable scales, activation PTQ, quantized folders.

    quantize_model(model, "int8" | "int4" | "int2" | "none", group_size=128, skip=None)
    enable_scale_training(model, mode="out" | "out_in", num_experts=1, interval=None) -> ScaleSelector
    scale_parameters / save_scales / load_scales
    calibrate_activations(unet, inputs, bits=8)             (Q-Diffusion-style W?A8)
    save_quantized(components, out_dir, config) / load_quantized(dir)
"""
from .activations import (ActQuantizer, QuantAttnProcessor, calibrate_activations, collect_unet_inputs,
                          set_activation_quant)
from .apply import WEIGHT_SCHEMES, parse_weights, quantize_model, quantized_layers, storage_bytes
from .modules import QConv2d, QLinear, QuantizedLayer
from .scales import (disable_scale_training, enable_scale_training, load_scales, save_scales,
                     scale_parameters, scale_selector, scales_state_dict)
from .io import load_quantized, read_index, save_quantized
from .timestep import ScaleSelector

__all__ = [
    "WEIGHT_SCHEMES", "parse_weights", "quantize_model", "quantized_layers", "storage_bytes",
    "QConv2d", "QLinear", "QuantizedLayer", "ScaleSelector",
    "enable_scale_training", "disable_scale_training", "scale_parameters", "scale_selector",
    "scales_state_dict", "save_scales", "load_scales",
    "ActQuantizer", "QuantAttnProcessor", "calibrate_activations", "collect_unet_inputs", "set_activation_quant",
    "save_quantized", "load_quantized", "read_index",
]
