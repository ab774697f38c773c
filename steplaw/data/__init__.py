"""Data: the embedded corpus, tokenizers (bytes; optional BPE) and token files."""
from steplaw.data.tokens import TokenData, load_token_data, prepare, read_token_file, write_token_file

__all__ = ["TokenData", "load_token_data", "prepare", "read_token_file", "write_token_file"]
