"""CLIP byte-pair tokenizer that works offline.

The BPE merges ship with the package (`bpe_simple_vocab_16e6.txt.gz`, see NOTICE_open_clip.txt); the
vocabulary is rebuilt from them the way OpenAI's CLIP does, and handed to transformers'
`CLIPTokenizer` in memory, so no file is fetched from a hub.
"""
from __future__ import annotations

import functools
import gzip
import os
from typing import List, Sequence, Tuple, Union

import numpy as np

BPE_PATH = os.path.join(os.path.dirname(__file__), "bpe_simple_vocab_16e6.txt.gz")
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2   # the merges CLIP uses: vocab 49408 = 2 * 256 bytes + merges + 2 special


def _bytes_to_unicode() -> List[str]:
  """GPT-2 / CLIP's reversible byte -> printable character table, in vocabulary order.

  Printable bytes map to themselves and come first; the other bytes follow, in byte order, mapped
  to code points from 256 on.
  """
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  rest = [b for b in range(256) if b not in keep]
  return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))]


def load_vocab(bpe_path: str = BPE_PATH) -> Tuple[dict, List[Tuple[str, str]]]:
  """Vocabulary (token -> id) and merge list (pairs) of CLIP's BPE."""
  with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  merges = [tuple(m.split(" ")) for m in lines[1:NUM_MERGES + 1]]   # line 0 is a version header
  chars = _bytes_to_unicode()
  tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
  return {t: i for i, t in enumerate(tokens)}, merges


@functools.lru_cache(maxsize=1)
def get_tokenizer():
  """transformers' CLIPTokenizer built from the bundled vocabulary (cached)."""
  from transformers import CLIPTokenizer  # Heavy import, only when text is tokenized.
  vocab, merges = load_vocab()
  return CLIPTokenizer(vocab=vocab, merges=merges)


def n_tokens(text: str) -> int:
  """The tokens `text` takes untruncated, SOT and EOT included (what must fit CONTEXT_LENGTH)."""
  return len(get_tokenizer()(text, add_special_tokens=False)["input_ids"]) + 2


def tokenize(texts: Union[str, Sequence[str]], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
  """Token ids (N, context_length) int32: SOT, BPE tokens, EOT, zero padding.

  Over-long text is truncated with its EOT kept in the last slot, as OpenAI's `clip.tokenize(...,
  truncate=True)` does; EOT is the largest id, so `argmax` finds it (text pooling).
  """
  if isinstance(texts, str):
    texts = [texts]
  tok = get_tokenizer()
  sot, eot = tok.convert_tokens_to_ids(SOT), tok.convert_tokens_to_ids(EOT)
  texts = list(texts)
  out = np.zeros((len(texts), context_length), np.int32)
  encoded = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
  for i, body in enumerate(encoded):
    ids = [sot] + list(body) + [eot]
    if len(ids) > context_length:
      ids = ids[:context_length - 1] + [eot]
    out[i, :len(ids)] = ids
  return out
