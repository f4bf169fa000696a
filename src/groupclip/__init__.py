"""groupclip: differentially private training for any PyTorch model, at near non-private speed."""

from groupclip import accounting
from groupclip.engine import PrivacyEngine
from groupclip.rules import EngineError

__version__ = "0.1.0"
__all__ = ["PrivacyEngine", "EngineError", "accounting", "__version__"]
