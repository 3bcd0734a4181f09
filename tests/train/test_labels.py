import torch

from flashmemory.dump.labels import (
    chunk_mass,
    chunk_peak,
    from_csr,
    golden_chunks,
    lookahead_peak,
    lookahead_targets,
    stack_peaks,
    to_csr,
    top_p_mask,
)


def test_chunk_mass_sums_tokens_and_averages_heads():
    probs = torch.zeros(2, 8)
    probs[0, 0:2] = 0.5  # head 0 looks at chunk 0
    probs[1, 6] = 1.0  # head 1 looks at chunk 3
    mass = chunk_mass(probs, 2)
    torch.testing.assert_close(mass, torch.tensor([0.5, 0.0, 0.0, 0.5]))


def test_top_p_mask_takes_the_smallest_covering_set():
    mass = torch.tensor([0.05, 0.5, 0.3, 0.15])
    assert top_p_mask(mass, 0.6).tolist() == [False, True, True, False]
    assert top_p_mask(mass, 0.5).tolist() == [False, True, False, False]
    assert top_p_mask(mass, 1.0).tolist() == [True, True, True, True]


def test_golden_needs_min_layers():
    masks = torch.tensor(
        [
            [1, 1, 0, 0],
            [1, 0, 1, 0],
            [1, 1, 0, 0],
            [0, 1, 0, 1],
        ],
        dtype=torch.bool,
    )
    ids, hits = golden_chunks(masks, 3)
    assert ids.tolist() == [0, 1]
    assert hits.tolist() == [3, 3]


def test_csr_round_trip():
    rows = [torch.tensor([1, 5]), torch.tensor([], dtype=torch.long), torch.tensor([0, 2, 9])]
    counts = [torch.tensor([3, 4]), torch.tensor([], dtype=torch.long), torch.tensor([3, 3, 5])]
    csr = to_csr(rows, counts)
    assert csr["indptr"].tolist() == [0, 2, 2, 5]
    back = from_csr(csr)
    assert [r.tolist() for r in back] == [r.tolist() for r in rows]
    assert csr["hits"].tolist() == [3, 4, 3, 3, 5]


def test_lookahead_targets_union_the_next_interval_steps():
    golden = [torch.tensor([0]), torch.tensor([1]), torch.tensor([2]), torch.tensor([3])]
    t = lookahead_targets(golden, interval=2, num_chunks=5)
    assert t.int().tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 0]]


def test_decidable_leaves_out_sink_and_recent_chunks():
    from flashmemory.dump.capture import LabelConfig

    cfg = LabelConfig(chunk_size=4, sink=4, recent=8)
    # 40 tokens = 10 chunks; chunk 0 touches the sink, chunks 8-9 reach into the newest 8 tokens.
    assert cfg.decidable(10, 40).tolist() == [False] + [True] * 7 + [False, False]


def test_far_chunk_is_golden_once_resident_mass_is_left_out():
    from flashmemory.dump.capture import LabelConfig

    cfg = LabelConfig(chunk_size=4, sink=4, recent=8, top_p=0.6)
    mass = torch.tensor([0.5, 0.01, 0.01, 0.1, 0.01, 0.01, 0.01, 0.01, 0.2, 0.16])  # sink + tail hold 86%
    assert not top_p_mask(mass, cfg.top_p)[3]  # with everything in, the sink and the tail fill the top-p set
    kept = top_p_mask(mass * cfg.decidable(10, 40), cfg.top_p)
    assert kept.nonzero().flatten().tolist() == [3]


def test_chunk_peak_keeps_the_one_head_that_reads_a_chunk():
    # head 0 spreads evenly over 4 chunks of 2 tokens; head 1 reads chunk 2 only
    probs = torch.tensor([[0.125] * 8, [0.0, 0.0, 0.0, 0.0, 0.6, 0.4, 0.0, 0.0]])
    assert torch.allclose(chunk_peak(probs, 2), torch.tensor([0.25, 0.25, 1.0, 0.25]))
    # the head mean halves it, and the even head's chunks come out at the same height as half of it
    assert torch.allclose(chunk_mass(probs, 2), torch.tensor([0.125, 0.125, 0.625, 0.125]))


def test_lookahead_peak_is_the_max_over_the_next_interval_steps():
    peaks = stack_peaks([torch.tensor([0.1, 0.2]), torch.tensor([0.9, 0.0, 0.3]), torch.tensor([0.0, 0.5, 0.0])])
    assert peaks.shape == (3, 3) and float(peaks[0, 2]) == 0.0  # the newer chunk did not exist yet
    out = lookahead_peak(peaks, interval=1, num_chunks=4)
    assert out.shape == (2, 4)
    assert torch.allclose(out, torch.tensor([[0.9, 0.0, 0.3, 0.0], [0.0, 0.5, 0.0, 0.0]]), atol=1e-3)
    wide = lookahead_peak(peaks, interval=8, num_chunks=3)
    assert torch.allclose(wide[0], torch.tensor([0.9, 0.5, 0.3]), atol=1e-3)


def test_ranking_by_the_label_recalls_what_the_kept_fraction_can_hold():
    from flashmemory.train.metrics import RecallCurve

    targets = torch.zeros(40, dtype=torch.bool)
    targets[[3, 9, 17, 22, 30, 31, 38, 39]] = True  # 8 needed of 40
    curve = RecallCurve(fractions=(0.05, 0.1, 0.2, 0.5))
    curve.add(targets.float(), targets, None)
    # keeps 2, 4, 8 and 20 chunks: the ceiling is min(kept, needed) / needed
    assert curve.recall() == [2 / 8, 4 / 8, 1.0, 1.0]
