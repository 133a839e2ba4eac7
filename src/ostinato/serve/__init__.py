"""Hand a trained model to other stacks: export/import (HF, GGUF), verify, serve, chat."""
