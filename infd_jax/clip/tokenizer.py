"""CLIP's byte-level BPE tokenizer, reading the merges file the user supplies.

The vocabulary is OpenAI's `bpe_simple_vocab_16e6.txt.gz` (a header line, then
one merge "a b" per line, by rank). It is not shipped here: pass its path, e.g.
the copy inside an installed `open_clip` or `clip` package, or the file from
github.com/openai/CLIP (clip/bpe_simple_vocab_16e6.txt.gz).

Text is cleaned as OpenAI's tokenizer does (NFC, HTML unescaped twice, whitespace runs
collapsed, lower-cased; ftfy's mojibake repair is not applied), split into words
by Unicode category (letter runs, single number characters, runs of other
non-space characters, English contractions, as OpenAI's regular expression), each word's UTF-8 bytes mapped to
printable characters and merged by rank. A sequence is
[start-of-text, tokens..., end-of-text] padded with 0 to the context length
(OpenCLIP's; `pad_with_eot` pads with end-of-text instead, as the Hugging Face
tokenizer of Stable Diffusion 1.x does); longer texts are cut and end with end-of-text.
"""

import functools
import gzip
import html
import unicodedata

import numpy as np
from etils import epath

_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# OpenAI reads the 48894 first merges (49152 tokens - 256 bytes - 2 specials).
_NUM_MERGES = 49152 - 256 - 2


@functools.cache
def byte_to_char() -> dict[int, str]:
  """A reversible map of the 256 byte values to printable characters (GPT-2's).

  Printable Latin-1 bytes map to themselves; the others to chr(256 + k) in byte order.
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  extra = [b for b in range(256) if b not in printable]
  return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(extra)}}


def split_words(text: str) -> list[str]:
  """The words of OpenAI's pre-tokenising pattern, by Unicode category."""
  words, i, n = [], 0, len(text)
  cat = lambda ch: unicodedata.category(ch)[0]
  while i < n:
    contraction = next((s for s in _CONTRACTIONS if text.startswith(s, i)), None)
    j = i + 1
    if contraction:
      j = i + len(contraction)
    elif cat(text[i]) == "L":
      while j < n and cat(text[j]) == "L":
        j += 1
    elif text[i].isspace():
      i += 1
      continue
    elif cat(text[i]) != "N":
      while j < n and not text[j].isspace() and cat(text[j]) not in "LN":
        j += 1
    words.append(text[i:j])
    i = j
  return words


class Tokenizer:
  """Text -> CLIP token ids [N, context_length] int32."""

  def __init__(self, bpe_path: str | epath.PathLike, context_length: int = 77,
               pad_with_eot: bool = False):
    path = epath.Path(bpe_path)
    if not path.exists():
      raise FileNotFoundError(f"CLIP BPE vocabulary {path} not found (bpe_simple_vocab_16e6.txt.gz)")
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:_NUM_MERGES + 1] if m.strip()]
    chars = list(byte_to_char().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    self.encoder = {tok: i for i, tok in enumerate(vocab)}
    self.ranks = {m: i for i, m in enumerate(merges)}
    # Start- and end-of-text follow the merges (literal special tokens in a text are not parsed).
    self.sot, self.eot = len(vocab), len(vocab) + 1
    self.vocab_size = len(vocab) + 2
    self.context_length = context_length
    self.pad = self.eot if pad_with_eot else 0
    self._cache: dict[str, str] = {}

  def bpe(self, word: str) -> list[str]:
    """Merges the symbols of one word (its last symbol marked "</w>") by rank."""
    if word in self._cache:
      return self._cache[word].split(" ")
    symbols = [*word[:-1], word[-1] + "</w>"]
    while len(symbols) > 1:
      best = min(zip(symbols, symbols[1:]), key=lambda p: self.ranks.get(p, np.inf))
      if best not in self.ranks:
        break
      merged, k = [], 0
      while k < len(symbols):
        if k + 1 < len(symbols) and (symbols[k], symbols[k + 1]) == best:
          merged.append(symbols[k] + symbols[k + 1])
          k += 2
        else:
          merged.append(symbols[k])
          k += 1
      symbols = merged
    self._cache[word] = " ".join(symbols)
    return symbols

  def encode(self, text: str) -> list[int]:
    """Token ids of one text, without start/end tokens."""
    text = unicodedata.normalize("NFC", html.unescape(html.unescape(text)))
    text = " ".join(text.split()).lower()
    table = byte_to_char()
    ids = []
    for word in split_words(text):
      mapped = "".join(table[b] for b in word.encode("utf-8"))
      ids.extend(self.encoder[s] for s in self.bpe(mapped))
    return ids

  def __call__(self, texts: str | list[str]) -> np.ndarray:
    texts = [texts] if isinstance(texts, str) else texts
    out = np.full((len(texts), self.context_length), self.pad, np.int32)
    for row, text in zip(out, texts):
      ids = [self.sot, *self.encode(text), self.eot][:self.context_length]
      ids[-1] = self.eot
      row[:len(ids)] = ids
    return out
