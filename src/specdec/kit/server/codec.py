"""Text in, tokens out: the tokenizer shapes `specdec serve` works with (kit)."""

from __future__ import annotations

from typing import Any, Optional


class CharTokenizer:
    """One character per token id, for the 64-token toy llamas (no EOS, no chat template unless
    one is given: a Jinja template over `messages`, as Hugging Face tokenizers use)."""

    ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,:?!\n01234"  # 64

    def __init__(self, vocab_size: int = 64, chat_template: Optional[str] = None):
        if vocab_size > len(self.ALPHABET):
            raise ValueError(f"CharTokenizer has {len(self.ALPHABET)} characters, the model needs {vocab_size}")
        self.chars = self.ALPHABET[:vocab_size]
        self.ids = {c: i for i, c in enumerate(self.chars)}
        self.chat_template = chat_template
        self.eos_token_ids: list[int] = []

    def encode(self, text: str) -> list[int]:
        bad = sorted({c for c in text if c not in self.ids})
        if bad:
            raise ValueError(f"characters {''.join(bad)!r} are not in the toy vocabulary "
                             f"{self.chars!r}")
        return [self.ids[c] for c in text]

    def decode(self, tokens: list[int]) -> str:
        return "".join(self.chars[t] for t in tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        import jinja2

        return jinja2.Template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt)


class TextCodec:
    """encode / decode / chat for an mlx-lm tokenizer or a CharTokenizer, in one shape."""

    def __init__(self, tokenizer: Any, chat_template: Optional[str] = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        ids = getattr(tokenizer, "eos_token_ids", None) or []
        self.eos_token_ids = sorted(int(i) for i in ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def chat(self, messages: list[dict]) -> list[int]:
        if isinstance(self.tokenizer, CharTokenizer):
            return self.encode(self.tokenizer.apply_chat_template(messages))
        kwargs = {"chat_template": self.chat_template} if self.chat_template else {}
        tokens = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        return list(tokens) if not isinstance(tokens, str) else self.encode(tokens)
