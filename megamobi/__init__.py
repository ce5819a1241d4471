"""megamobi: Megatron-style distributed pretraining for MobiLlama (one FFN shared by all layers)."""

__version__ = "0.1.0"
