"""The on-disk top-k cache: bit-for-bit round trips, the loss read from it, and clear errors."""

import json
import math

import numpy as np
import pytest
import torch

import fastkd
from conftest import DEVICE
from fastkd.topk import PAD_ID
from fastkd.topk_cache import TopKCache, TopKCacheWriter
from reference import rel_err

V, K = 500, 6


def _sequence(length, generator):
    """A random teacher's top-k for one sequence: distinct ids, log-probs ≤ 0, in float64."""
    logits = torch.randn(length, V, generator=generator, dtype=torch.float64) * 3
    logprobs, indices = torch.log_softmax(logits, -1).topk(K, dim=-1)
    return indices, logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_for_bit_across_shards(tmp_path, dtype):
    generator = torch.Generator().manual_seed(3)
    lengths = [5, 0, 17, 1, 9, 30, 2]
    written = []
    with TopKCacheWriter(tmp_path, vocab_size=V, k=K, temperature=0.7, logprobs_dtype=dtype,
                         shard_tokens=20) as writer:
        for number, length in enumerate(lengths):
            indices, logprobs = _sequence(length, generator)
            mask = torch.ones(length, K, dtype=torch.bool)
            if length > 3:
                mask[1, 4:] = False  # ragged k: a row with 4 entries
                indices[2] = PAD_ID  # a row with none (an ignored row of fused_linear_topk)
            assert writer.add(indices.int() if number % 2 else indices, logprobs, mask) == number
            present = mask & (indices != PAD_ID)
            written.append((torch.where(present, indices, PAD_ID),
                            torch.where(present, logprobs.to(dtype), -math.inf), present))
    index = json.loads((tmp_path / "index.json").read_text())
    assert len(index["shards"]) > 2 and index["tokens"] == sum(lengths)
    cache = TopKCache(tmp_path, vocab_size=V, k=K)
    assert (len(cache), cache.k, cache.vocab_size, cache.temperature, cache.logprobs_dtype) == (
        len(lengths), K, V, 0.7, dtype)
    for number, (indices, logprobs, mask) in enumerate(written):
        item = cache[number]
        assert item.indices.dtype == torch.int64 and item.logprobs.dtype == dtype
        assert torch.equal(item.indices, indices) and torch.equal(item.mask, mask)
        # Bit for bit, -inf included: compare the stored bits, not the values.
        bits = torch.int16 if dtype != torch.float32 else torch.int32
        assert torch.equal(item.logprobs.view(bits), logprobs.view(bits))
    assert torch.equal(cache[-1].indices, written[-1][0])


def test_the_loss_reads_the_cache_directly(tmp_path):
    # fused_linear_topk → cache → batch → sparse_kd_loss equals the loss on the top-k kept in
    # memory, and the float64 reference on the (B, T) layout, padded rows ignored via labels.
    hidden = [torch.randn(length, 16) for length in (7, 4, 9)]
    weight = torch.randn(V, 16) * 0.5
    temperature = 0.8
    with TopKCacheWriter(tmp_path, vocab_size=V, k=K, temperature=temperature) as writer:
        for h in hidden:
            writer.add(*fastkd.fused_linear_topk(h, weight, K, temperature=temperature))
    cache = TopKCache(tmp_path, vocab_size=V)
    batch = cache.batch([2, 0, 1])
    assert batch.indices.shape == (3, 9, K) and batch.complete_rows.sum() == 20
    student = torch.randn(3, 9, V, requires_grad=True)
    labels = torch.randint(0, V, (3, 9)).masked_fill(~batch.complete_rows, -100)
    loss = fastkd.sparse_kd_loss(student, batch.indices, batch.logprobs, labels, temperature=temperature,
                                 teacher_temperature=cache.temperature)
    in_memory = [fastkd.fused_linear_topk(hidden[i], weight, K, temperature=temperature) for i in (2, 0, 1)]
    rows = torch.cat([student[b, :len(hidden[i])] for b, i in enumerate((2, 0, 1))])
    expected = fastkd.sparse_kd_loss(rows, torch.cat([t.indices for t in in_memory]),
                                     torch.cat([t.logprobs for t in in_memory]), temperature=temperature,
                                     teacher_temperature=temperature)
    assert torch.isfinite(loss) and rel_err(loss, expected) < 1e-6
    (grad,) = torch.autograd.grad(loss, student)
    assert (grad[~batch.complete_rows] == 0).all()


def test_an_interrupted_write_cannot_be_opened(tmp_path):
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(RuntimeError, match="teacher crashed"):
        with TopKCacheWriter(tmp_path, vocab_size=V, k=K, shard_tokens=1) as writer:
            writer.add(*_sequence(3, generator))
            raise RuntimeError("teacher crashed")
    assert list(tmp_path.glob("shard-00000.*.npy"))
    with pytest.raises(FileNotFoundError, match="index.json is missing"):
        TopKCache(tmp_path)


WRITE_ERRORS = [
    (lambda i, lp: (i[:, :4], lp[:, :4]), ValueError, ["indices must have shape (T, k=6)"]),
    (lambda i, lp: (i, lp[:-1]), ValueError, ["logprobs shape", "does not match"]),
    (lambda i, lp: (i.float(), lp), TypeError, ["indices", "integer"]),
    (lambda i, lp: (i, lp.long()), TypeError, ["logprobs", "floating-point"]),
    (lambda i, lp: (i.index_fill(1, torch.tensor([0]), V), lp), ValueError, ["outside [0, vocab_size=500)"]),
    (lambda i, lp: (i.index_fill(1, torch.tensor([0]), -5), lp), ValueError, ["outside", "PAD_ID"]),
    (lambda i, lp: (i.index_copy(1, torch.tensor([1]), i[:, :1]), lp), ValueError, ["repeats a token id"]),
    (lambda i, lp: (i, lp.index_fill(1, torch.tensor([2]), 0.5)), ValueError, ["log-probabilities"]),
    (lambda i, lp: (i, lp.index_fill(1, torch.tensor([2]), math.nan)), ValueError, ["log-probabilities"]),
]


@pytest.mark.parametrize("change,error,words", WRITE_ERRORS)
def test_bad_sequences_name_what_is_wrong(tmp_path, change, error, words):
    indices, logprobs = _sequence(4, torch.Generator().manual_seed(0))
    writer = TopKCacheWriter(tmp_path, vocab_size=V, k=K)
    with pytest.raises(error) as info:
        writer.add(*change(indices, logprobs))
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_writer_and_reader_refuse_what_does_not_match(tmp_path):
    with pytest.raises(ValueError, match=r"k must lie in \[1, vocab_size=10\]"):
        TopKCacheWriter(tmp_path / "a", vocab_size=10, k=11)
    with pytest.raises(ValueError, match="logprobs_dtype"):
        TopKCacheWriter(tmp_path / "a", vocab_size=10, k=2, logprobs_dtype=torch.float64)
    with pytest.raises(ValueError, match="temperature"):
        TopKCacheWriter(tmp_path / "a", vocab_size=10, k=2, temperature=0.0)
    with TopKCacheWriter(tmp_path / "c", vocab_size=V, k=K) as writer:
        writer.add(*_sequence(5, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="closed"):
        writer.add(*_sequence(5, torch.Generator().manual_seed(0)))
    with pytest.raises(FileExistsError, match="already holds a top-k cache"):
        TopKCacheWriter(tmp_path / "c", vocab_size=V, k=K)
    with pytest.raises(ValueError, match="holds vocab_size=500, not the vocab_size=501"):
        TopKCache(tmp_path / "c", vocab_size=501)
    with pytest.raises(ValueError, match="holds k=6, not the k=8"):
        TopKCache(tmp_path / "c", k=8)
    cache = TopKCache(tmp_path / "c")
    with pytest.raises(IndexError, match="sequence 1 is out of range"):
        cache[1]
    with pytest.raises(ValueError, match="length=3 is shorter"):
        cache.batch([0], length=3)
    # A shard that does not match the index is named.
    np.save(tmp_path / "c" / "shard-00000.ids.npy", np.zeros((5, K + 1), dtype=np.int32))
    with pytest.raises(ValueError, match="shard-00000 .*does not match index.json: ids are int32 \\(5, 7\\)"):
        TopKCache(tmp_path / "c")
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    (tmp_path / "c" / "index.json").write_text(json.dumps(dict(index, version=99)))
    with pytest.raises(ValueError, match="not a fastkd-topk-cache version 1 index"):
        TopKCache(tmp_path / "c")


def test_cache_on_the_device_under_test(tmp_path):
    # The writer takes the teacher's outputs wherever they are; the reader gives CPU tensors.
    hidden, weight = torch.randn(6, 8, device=DEVICE), torch.randn(V, 8, device=DEVICE)
    topk = fastkd.fused_linear_topk(hidden, weight, K)
    with TopKCacheWriter(tmp_path, vocab_size=V, k=K) as writer:
        writer.add(*topk)
    item = TopKCache(tmp_path)[0]
    assert torch.equal(item.indices, topk.indices.cpu()) and torch.equal(item.logprobs, topk.logprobs.cpu())
