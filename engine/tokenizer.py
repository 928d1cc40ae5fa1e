"""Tokenizer from the checkpoint's tokenizer.json, read with the `tokenizers` library as written.

(transformers picks a tokenizer class from the model type, which mis-reads word-level vocabularies.)
"""
import json

import fsspec
from tokenizers import Tokenizer as HFTokenizer

from engine.loader import read_json


def token_content(token) -> str | None:
    """A special token as tokenizer_config.json gives it: a string, or an AddedToken's {"content": ...}."""
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
        eos = token_content(tok_config.get("eos_token"))
        if eos is not None and self._tok.token_to_id(eos) is not None:
            self.eos_token_ids.add(self._tok.token_to_id(eos))
        # Prepend BOS when the config asks and tokenizer.json's post-processor does not already do it.
        bos = token_content(tok_config.get("bos_token"))
        self.bos_token_id = self._tok.token_to_id(bos) if bos else None
        self.add_bos = bool(tok_config.get("add_bos_token")) and self.bos_token_id is not None
        self._spelling: HFTokenizer | None = None    # encode_as_text's copy, made when first needed

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    @property
    def added_tokens(self) -> dict[str, tuple[int, bool]]:
        """The tokens added to the vocabulary (control tokens and the like): content -> (id, special?)."""
        return {t.content: (i, t.special) for i, t in self._tok.get_added_tokens_decoder().items()}

    def encode_rendered(self, text: str) -> list[int]:
        """A prompt rendered from a chat template: its added tokens are tokens, and nothing is added around
        it (the template writes BOS itself), as transformers tokenizes apply_chat_template's text."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_as_text(self, text: str) -> list[int]:
        """Text whose added tokens are spelled out as ordinary text (a control token typed into a message)."""
        if self._spelling is None:
            spec = json.loads(self._tok.to_str())
            for token in spec.get("added_tokens", []):
                token["special"] = True     # encode_special_tokens spells out special tokens only
            self._spelling = HFTokenizer.from_str(json.dumps(spec))
            self._spelling.encode_special_tokens = True
        return self._spelling.encode(text, add_special_tokens=False).ids

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is encoded as: BOS, or EOS where the model has no BOS (as the harness does)."""
        if self.bos_token_id is None and not self.eos_token_ids:
            raise ValueError("the model has neither a BOS nor an EOS token to stand for an empty prompt: give the "
                             "scored row a prompt")
        return self.bos_token_id if self.bos_token_id is not None else min(self.eos_token_ids)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-evaluation-harness splits them: trailing whitespace of the
        context moves to the continuation; the continuation's ids are those of the whole text past the
        context's own encoding (a merge across the boundary is counted in the continuation); an empty
        context is the prefix token alone."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.prefix_token_id], self.encode(continuation, add_special_tokens=False)
        context_ids = self.encode(context)
        return context_ids, self.encode(context + continuation)[len(context_ids):]

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token as text, special tokens included (for per-token log-probabilities)."""
        return self._tok.decode([token_id], skip_special_tokens=False)
