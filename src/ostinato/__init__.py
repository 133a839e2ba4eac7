"""ostinato: carry LLM training to the finish line on hardware that does not cooperate."""

__version__ = "0.1.0"
