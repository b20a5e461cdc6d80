"""Circuit attribution on stock HF causal LMs: EAP-IG edge scores (`eap`), circuits and faithfulness (`circuit`),
CAD (`cad`), artifacts and circuit-tracer export (`serialize`), captum token view (`tokens`).

Submodules import torch; this package file imports nothing so `import mansu` stays cheap.
"""
