"""tokencompress: learn which tokens of a text can be dropped, and prove the text stays recoverable."""

from tokencompress_env.reconstructor import Reconstructor, ScoreResult

__all__ = ["Reconstructor", "ScoreResult"]
__version__ = "0.1.0"
