"""Conversion between megamobi checkpoints and the formats others load.

- `export_hf`: checkpoint -> Hugging Face directory for stock `transformers.LlamaForCausalLM`.
- `import_hf`: Hugging Face Llama / MobiLlama -> checkpoint at step 0, to continue pretraining.
- `export_gguf`: checkpoint -> GGUF file for llama.cpp.

CLI: `python -m megamobi.convert {to-hf,from-hf,to-gguf} ...`; see docs/convert.md.
"""

from megamobi.convert.errors import ConversionError
from megamobi.convert.from_hf import import_hf
from megamobi.convert.to_gguf import export_gguf
from megamobi.convert.to_hf import export_hf

__all__ = ["ConversionError", "export_gguf", "export_hf", "import_hf"]
