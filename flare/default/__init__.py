"""The built-in default of ``flare train``: a synthetic bilingual sentiment sample shipped with the
package (``sample.py``, ``toy_sentiment.jsonl``), a word-level tokenizer and a tiny random Llama built
locally (``build.py``). No hub access needed; the run takes about a minute on two CPU cores."""

from .build import build_tokenizer, load_4bit, save_tiny_llama
from .sample import LANGUAGES, SAMPLE_PATH, generate, load_sample

__all__ = ["LANGUAGES", "SAMPLE_PATH", "build_tokenizer", "generate", "load_4bit", "load_sample", "save_tiny_llama"]
