"""INT8: one rounding rule (``rounding``), the int8 layers (``layers``), post-training quantization
(``ptq``), quantization-aware training (``qat``) and Conv+BatchNorm folding (``fold``)."""
