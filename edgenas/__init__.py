"""edgenas: LLM-driven architecture search with feedback memory, measured for edge devices."""

__version__ = "0.1.0"
