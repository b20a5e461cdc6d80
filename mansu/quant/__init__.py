"""NF4 (bitsandbytes 4-bit NormalFloat) for mansu: a bit-exact pure-torch quantizer (nf4), per-weight cell
geometry and the exact code-changing move (geometry), survival of an update and grid alignment (survival),
which weights transformers quantizes (targets), and NF4 twins with the PTQ gap (twin).  See docs/nf4.md.

Submodules are imported explicitly (`from mansu.quant.nf4 import quantize_nf4`) so `import mansu` stays cheap.
"""
