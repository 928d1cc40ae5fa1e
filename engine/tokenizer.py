"""Tokenizer from the checkpoint's tokenizer.json, read with the `tokenizers` library as written.

(transformers picks a tokenizer class from the model type, which mis-reads word-level vocabularies.)
"""
import fsspec
from tokenizers import Tokenizer as HFTokenizer

from engine.loader import read_json


def _token_content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    def __init__(self, model_url: str, storage_options: dict | None = None):
        base = model_url.rstrip("/")
        with fsspec.open(f"{base}/tokenizer.json", "r", encoding="utf-8", **(storage_options or {})) as f:
            self._tok = HFTokenizer.from_str(f.read())
        tok_config = read_json(f"{base}/tokenizer_config.json", storage_options, missing_ok=True) or {}
        config = read_json(f"{base}/config.json", storage_options)
        gen_config = read_json(f"{base}/generation_config.json", storage_options, missing_ok=True) or {}
        self.eos_token_ids = set()
        for source in (config, gen_config):
            ids = source.get("eos_token_id")
            self.eos_token_ids.update(ids if isinstance(ids, list) else [] if ids is None else [ids])
        eos = _token_content(tok_config.get("eos_token"))
        if eos is not None and self._tok.token_to_id(eos) is not None:
            self.eos_token_ids.add(self._tok.token_to_id(eos))
        # Prepend BOS when the config asks and tokenizer.json's post-processor does not already do it.
        bos = _token_content(tok_config.get("bos_token"))
        self.bos_token_id = self._tok.token_to_id(bos) if bos else None
        self.add_bos = bool(tok_config.get("add_bos_token")) and self.bos_token_id is not None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text).ids
        if self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)
