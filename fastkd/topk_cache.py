"""Sharded on-disk caches of a teacher's top-k (token ids and log-probabilities per token), written
once offline (e.g. from :func:`fastkd.fused_linear_topk`) and read back for the sparse losses.

Layout of a cache directory (numpy files, readable without fastkd)::

    index.json                 format, version, vocab_size, k, temperature (of generation),
                               logprobs_dtype, pad_id, counts, and the shards in order
    shard-00000.ids.npy        (tokens, k) int32 token ids; PAD_ID (-1) where an entry is absent
    shard-00000.logprobs.npy   (tokens, k) float32 | float16 | bfloat16 (stored as its int16 bits);
                               -inf where an entry is absent
    shard-00000.offsets.npy    (sequences + 1,) int64: sequence i of the shard is tokens
                               [offsets[i], offsets[i + 1])

A sequence never spans two shards. The mask of present entries is ``ids != PAD_ID``: absent
entries (ignored rows of fused_linear_topk, or rows with fewer than k log-probs from a server)
cost no extra storage. Shards are memory-mapped on reading: one sequence reads its own bytes.
``index.json`` is written last, so a cache interrupted while writing has none and cannot be
opened half written.
"""

import bisect
import json
import os
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .kernels.topk.contract import PAD_ID

__all__ = ["TopKBatch", "TopKCache", "TopKCacheWriter", "TopKSequence"]

FORMAT = "fastkd-topk-cache"
VERSION = 1
INDEX = "index.json"
# torch dtype ↔ (index name, numpy dtype on disk); numpy has no bfloat16, so its bits are stored.
_LOGPROB_DTYPES = {torch.float32: ("float32", np.float32), torch.float16: ("float16", np.float16),
                   torch.bfloat16: ("bfloat16", np.int16)}
_BY_NAME = {name: dtype for dtype, (name, _) in _LOGPROB_DTYPES.items()}
# Rounding of a stored log-probability may make it slightly positive; more than this is not one.
_POSITIVE_SLACK = 1e-3


class TopKSequence(NamedTuple):
    """One sequence of a cache: indices (T, k) int64, logprobs (T, k) in the cache's dtype, mask
    (T, k) bool (False where an entry is absent: id PAD_ID, log-prob -inf)."""

    indices: Tensor
    logprobs: Tensor
    mask: Tensor


class TopKBatch(NamedTuple):
    """Sequences padded to one length T: indices (B, T, k) int64, logprobs (B, T, k), mask (B, T, k).

    Pass ``indices``, ``logprobs`` and ``teacher_mask=mask`` to :func:`fastkd.sparse_kd_loss` with
    student logits (B, T, V), and ``teacher_temperature=cache.temperature``. Absent entries (id
    PAD_ID, log-prob -inf) are left out of the row's support even without the mask (the sparse
    losses' default ``pad_id`` is PAD_ID); a row with none present (padding) is an ignored row."""

    indices: Tensor
    logprobs: Tensor
    mask: Tensor

    @property
    def complete_rows(self) -> Tensor:
        """(B, T) bool: rows holding all k entries."""
        return self.mask.all(-1)


class TopKCacheWriter:
    """Writes a cache directory, one sequence at a time::

        with TopKCacheWriter(path, vocab_size=V, k=64, temperature=1.0) as writer:
            for hidden in teacher_hidden_states:             # (T, H) per sequence
                writer.add(*fastkd.fused_linear_topk(hidden, lm_head, 64))

    Args:
        path: a directory; created if missing, and it must not hold a cache already.
        vocab_size: the teacher's vocabulary V; every stored id lies in [0, V).
        k: entries per token.
        temperature: the temperature the log-probabilities were computed at (kept in the index;
            pass it back as ``teacher_temperature``).
        logprobs_dtype: torch.float32, float16 or bfloat16 on disk (log-probs are rounded to it).
        shard_tokens: a new shard starts once a shard holds at least this many tokens.
    """

    def __init__(self, path, *, vocab_size: int, k: int, temperature: float = 1.0,
                 logprobs_dtype: torch.dtype = torch.float32, shard_tokens: int = 1 << 20):
        for name, value in (("vocab_size", vocab_size), ("k", k), ("shard_tokens", shard_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if k > vocab_size:
            raise ValueError(f"k must lie in [1, vocab_size={vocab_size}]; got {k}")
        if vocab_size > np.iinfo(np.int32).max:
            raise ValueError(f"vocab_size must fit int32 ids; got {vocab_size}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
        if logprobs_dtype not in _LOGPROB_DTYPES:
            raise ValueError(f"logprobs_dtype must be one of torch.float32, torch.float16, torch.bfloat16; "
                             f"got {logprobs_dtype}")
        self.path = Path(path)
        if (self.path / INDEX).exists():
            raise FileExistsError(f"{self.path} already holds a top-k cache ({INDEX}); write to a new directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self.vocab_size, self.k, self.temperature = vocab_size, k, float(temperature)
        self.logprobs_dtype, self.shard_tokens = logprobs_dtype, shard_tokens
        self._shards, self._ids, self._logprobs, self._lengths = [], [], [], []
        self._sequences = self._tokens = self._pending_tokens = 0
        self._closed = False

    def add(self, indices: Tensor, logprobs: Tensor, mask: Optional[Tensor] = None) -> int:
        """Appends one sequence: indices (T, k) int, logprobs (T, k) float, mask (T, k) bool or None
        (entries where it is False, and entries whose id is PAD_ID, are stored as absent).
        Checks the ids and log-probs (on the host: this is offline work). Returns the sequence's
        number in the cache."""
        if self._closed:
            raise ValueError("this TopKCacheWriter is closed")
        ids, values = self._checked(indices, logprobs, mask)
        self._ids.append(ids)
        self._logprobs.append(values)
        self._lengths.append(ids.shape[0])
        self._sequences += 1
        self._pending_tokens += ids.shape[0]
        if self._pending_tokens >= self.shard_tokens:
            self._flush()
        return self._sequences - 1

    def _checked(self, indices, logprobs, mask):
        if not isinstance(indices, Tensor) or indices.is_floating_point() or indices.is_complex() or (
                indices.dtype == torch.bool):
            raise TypeError(f"indices must be an integer torch.Tensor of token ids; got "
                            f"{getattr(indices, 'dtype', type(indices).__name__)}")
        if not isinstance(logprobs, Tensor) or not logprobs.is_floating_point():
            raise TypeError(f"logprobs must be a floating-point torch.Tensor; got "
                            f"{getattr(logprobs, 'dtype', type(logprobs).__name__)}")
        if indices.dim() != 2 or indices.shape[1] != self.k:
            raise ValueError(f"indices must have shape (T, k={self.k}) (one sequence); got {tuple(indices.shape)}")
        if logprobs.shape != indices.shape:
            raise ValueError(f"logprobs shape {tuple(logprobs.shape)} does not match indices shape "
                             f"{tuple(indices.shape)}")
        indices, logprobs = indices.detach().cpu().long(), logprobs.detach().cpu()
        present = indices != PAD_ID
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != indices.shape:
                raise ValueError(f"mask must be a bool tensor of shape {tuple(indices.shape)}; got "
                                 f"{getattr(mask, 'dtype', type(mask).__name__)} "
                                 f"{tuple(getattr(mask, 'shape', ()))}")
            present &= mask.cpu()
        outside = present & ((indices < 0) | (indices >= self.vocab_size))
        if outside.any():
            bad = indices[outside]
            raise ValueError(f"indices holds token ids outside [0, vocab_size={self.vocab_size}) (min "
                             f"{int(bad.min())}, max {int(bad.max())}); ids of absent entries must be PAD_ID "
                             f"({PAD_ID}) or masked")
        ids = torch.where(present, indices, PAD_ID)
        ordered = ids.sort(-1).values
        if ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != PAD_ID)).any():
            raise ValueError("indices repeats a token id within a row; each row's top-k ids must be distinct")
        values = logprobs.to(self.logprobs_dtype)
        if (present & (torch.isnan(values) | (values > _POSITIVE_SLACK))).any():
            raise ValueError("logprobs must be log-probabilities (≤ 0, no NaN) where an entry is present")
        values = torch.where(present, values, float("-inf"))
        stored = values.view(torch.int16) if self.logprobs_dtype == torch.bfloat16 else values
        return ids.to(torch.int32).numpy(), stored.numpy()

    def _flush(self):
        if not self._lengths:
            return
        name = f"shard-{len(self._shards):05d}"
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(self._lengths, out=offsets[1:])
        np.save(self.path / f"{name}.ids.npy", np.concatenate(self._ids))
        np.save(self.path / f"{name}.logprobs.npy", np.concatenate(self._logprobs))
        np.save(self.path / f"{name}.offsets.npy", offsets)
        self._shards.append({"name": name, "sequences": len(self._lengths), "tokens": int(offsets[-1])})
        self._tokens += int(offsets[-1])
        self._ids, self._logprobs, self._lengths = [], [], []
        self._pending_tokens = 0

    def close(self):
        """Writes the last shard and the index. Idempotent."""
        if self._closed:
            return
        self._flush()
        index = {"format": FORMAT, "version": VERSION, "vocab_size": self.vocab_size, "k": self.k,
                 "temperature": self.temperature, "logprobs_dtype": _LOGPROB_DTYPES[self.logprobs_dtype][0],
                 "ids_dtype": "int32", "pad_id": PAD_ID, "sequences": self._sequences, "tokens": self._tokens,
                 "shards": self._shards}
        temporary = self.path / (INDEX + ".tmp")
        temporary.write_text(json.dumps(index, indent=1))
        os.replace(temporary, self.path / INDEX)
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, error_type, error, traceback):
        # After an error nothing more is written: without its index the cache cannot be opened.
        if error_type is None:
            self.close()
        return False


class TopKCache:
    """Reads a cache written by :class:`TopKCacheWriter`.

    ``cache[i]`` is sequence i as a TopKSequence; ``cache.batch(ids)`` pads several into a
    TopKBatch. Attributes: ``vocab_size``, ``k``, ``temperature`` (of generation), ``logprobs_dtype``,
    ``tokens``, ``len(cache)`` (sequences).

    Args:
        path: the cache directory.
        vocab_size, k: when given, the cache must hold these (e.g. the student's vocabulary):
            a mismatch raises here, not as a wrong loss later.
    """

    def __init__(self, path, *, vocab_size: Optional[int] = None, k: Optional[int] = None):
        self.path = Path(path)
        index_path = self.path / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"no top-k cache at {self.path}: {INDEX} is missing (an unfinished write leaves "
                                    "none)")
        index = json.loads(index_path.read_text())
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise ValueError(f"{index_path} is not a {FORMAT} version {VERSION} index (format "
                             f"{index.get('format')!r}, version {index.get('version')!r})")
        self.vocab_size, self.k, self.temperature = index["vocab_size"], index["k"], index["temperature"]
        for name, wanted, held in (("vocab_size", vocab_size, self.vocab_size), ("k", k, self.k)):
            if wanted is not None and wanted != held:
                raise ValueError(f"the cache at {self.path} holds {name}={held}, not the {name}={wanted} asked for")
        if index["logprobs_dtype"] not in _BY_NAME:
            raise ValueError(f"{index_path}: unknown logprobs_dtype {index['logprobs_dtype']!r}")
        self.logprobs_dtype = _BY_NAME[index["logprobs_dtype"]]
        self.tokens = index["tokens"]
        self._shards = [self._open_shard(shard) for shard in index["shards"]]
        self._first = [0]  # the number of the first sequence of each shard, then the total
        for shard in index["shards"]:
            self._first.append(self._first[-1] + shard["sequences"])
        if self._first[-1] != index["sequences"]:
            raise ValueError(f"{index_path}: the shards hold {self._first[-1]} sequences, the index says "
                             f"{index['sequences']}")

    def _open_shard(self, shard):
        name = shard["name"]
        try:
            ids, logprobs, offsets = (np.load(self.path / f"{name}.{part}.npy", mmap_mode="r")
                                      for part in ("ids", "logprobs", "offsets"))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"the cache at {self.path} lists {name}, whose files are missing: {exc}") from None
        disk_dtype = _LOGPROB_DTYPES[self.logprobs_dtype][1]
        expected = (shard["tokens"], self.k)
        problems = []
        if ids.shape != expected or ids.dtype != np.int32:
            problems.append(f"ids are {ids.dtype} {ids.shape}, expected int32 {expected}")
        if logprobs.shape != expected or logprobs.dtype != disk_dtype:
            problems.append(f"logprobs are {logprobs.dtype} {logprobs.shape}, expected {np.dtype(disk_dtype)} "
                            f"{expected}")
        if offsets.shape != (shard["sequences"] + 1,) or offsets[0] != 0 or offsets[-1] != shard["tokens"]:
            problems.append(f"offsets {offsets.shape} do not cover {shard['sequences']} sequences of "
                            f"{shard['tokens']} tokens")
        if problems:
            raise ValueError(f"{name} of the cache at {self.path} does not match {INDEX}: " + "; ".join(problems))
        return ids, logprobs, offsets

    def __len__(self):
        return self._first[-1]

    def __getitem__(self, sequence: int) -> TopKSequence:
        if isinstance(sequence, bool) or not isinstance(sequence, (int, np.integer)):
            raise TypeError(f"a cache is indexed by sequence number (int); got {type(sequence).__name__}")
        if not -len(self) <= sequence < len(self):
            raise IndexError(f"sequence {sequence} is out of range for a cache of {len(self)} sequences")
        sequence = int(sequence) % len(self)
        shard = bisect.bisect_right(self._first, sequence) - 1
        ids, logprobs, offsets = self._shards[shard]
        start, stop = int(offsets[sequence - self._first[shard]]), int(offsets[sequence - self._first[shard] + 1])
        indices = torch.from_numpy(np.array(ids[start:stop], dtype=np.int64))
        values = torch.from_numpy(np.array(logprobs[start:stop]))
        if self.logprobs_dtype == torch.bfloat16:
            values = values.view(torch.bfloat16)
        return TopKSequence(indices, values, indices != PAD_ID)

    def batch(self, sequences: Sequence[int], *, length: Optional[int] = None) -> TopKBatch:
        """Sequences padded (absent entries: PAD_ID, -inf) to ``length`` (default: the longest)
        into a TopKBatch (B, T, k). A sequence longer than ``length`` raises."""
        items = [self[sequence] for sequence in sequences]
        longest = max((item.indices.shape[0] for item in items), default=0)
        length = longest if length is None else length
        if longest > length:
            raise ValueError(f"length={length} is shorter than a sequence of the batch ({longest} tokens)")
        indices = torch.full((len(items), length, self.k), PAD_ID, dtype=torch.int64)
        logprobs = torch.full((len(items), length, self.k), float("-inf"), dtype=self.logprobs_dtype)
        for row, item in enumerate(items):
            indices[row, :item.indices.shape[0]] = item.indices
            logprobs[row, :item.indices.shape[0]] = item.logprobs
        return TopKBatch(indices, logprobs, indices != PAD_ID)
