"""One module per quantizer behind mansu.quant.base.Quantizer; the registry is mansu.quant.registry."""
