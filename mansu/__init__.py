"""mansu: quantization-permanent LLM unlearning (MANSU) and the tools to see it.

`import mansu` stays cheap: torch-heavy modules are imported by the code that needs them.
"""

__version__ = "0.1.0"
