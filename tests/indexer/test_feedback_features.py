import pytest
import torch

from flashmemory.indexer.feedback import (
    FEATURE_VERSIONS,
    FeedbackCounts,
    FeedbackHead,
    FeedbackSpec,
    chunk_distance,
    feedback_features,
)

N = 12


def _counts(**over) -> FeedbackCounts:
    zero = torch.zeros(N, dtype=torch.long)
    base = dict(
        prompt_hits=zero,
        prompt_rows=64,
        decode_hits=zero,
        resident_steps=torch.full((N,), 64),
        decode_steps=64,
        votes=torch.zeros(N),
        recent_hits=zero,
        recent_steps=16,
    )
    return FeedbackCounts(**{**base, **over})


def _features(spec: FeedbackSpec, counts: FeedbackCounts) -> torch.Tensor:
    return feedback_features(torch.zeros(N), counts, chunk_distance(N, N * 16 - 1, 16), spec)


def column(spec: FeedbackSpec, name: str) -> int:
    return spec.features.index(name)


def test_version_1_reads_the_first_eight_inputs_and_version_2_adds_the_heading_ones():
    counts = _counts(decode_hits=torch.arange(N))
    v1, v2 = FeedbackSpec(), FeedbackSpec(version=2)
    f1, f2 = _features(v1, counts), _features(v2, counts)
    assert f1.shape == (N, 8) and f2.shape == (N, len(FEATURE_VERSIONS[2])) and f2.shape[1] > 8
    torch.testing.assert_close(f2[:, :8], f1)
    assert FeedbackHead(v2).net[0].in_features == f2.shape[1]


def test_chunks_after_a_read_chunk_carry_its_rate_and_the_chunks_before_it_too():
    spec = FeedbackSpec(version=2)
    decode = torch.zeros(N, dtype=torch.long)
    decode[3] = 32  # read in half the window's steps
    recent = torch.zeros(N, dtype=torch.long)
    recent[3] = 8
    f = _features(spec, _counts(decode_hits=decode, recent_hits=recent))
    before = f[:, column(spec, "best decode consensus rate of the 4 chunks before")]
    assert before.tolist() == [0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5, 0, 0, 0, 0]
    recent_before = f[:, column(spec, "best last-quarter decode consensus rate of the 4 chunks before")]
    assert recent_before[4:8].tolist() == [0.5] * 4 and float(recent_before.sum()) == 2.0
    after = f[:, column(spec, "best decode consensus rate of the 2 chunks after")]
    assert after.tolist() == [0, 0.5, 0.5] + [0] * 9


def test_vote_share_is_averaged_over_the_window_steps():
    spec = FeedbackSpec(version=2)
    votes = torch.zeros(N)
    votes[5] = 16.0  # e.g. a third of the layers in 48 of the 64 steps
    f = _features(spec, _counts(votes=votes))
    assert float(f[5, column(spec, "mean share of layers voting for the chunk over the decode window")]) == 0.25


def test_replayed_counts_may_hold_one_window_fill_per_step():
    """A replay asks for every step at once: the fills broadcast per step, and equal the one-step answers."""
    spec = FeedbackSpec(version=2)
    hits = torch.randint(0, 5, (3, N))
    fills = torch.tensor([[0], [3], [64]])
    many = FeedbackCounts(
        prompt_hits=torch.zeros(3, N, dtype=torch.long),
        prompt_rows=64,
        decode_hits=hits,
        resident_steps=hits,
        decode_steps=fills,
        votes=hits.float(),
        recent_hits=hits,
        recent_steps=fills.clamp(max=16),
    )
    together = feedback_features(torch.zeros(3, N), many, torch.zeros(3, N), spec)
    for i in range(3):
        fill = int(fills[i])
        one = FeedbackCounts(
            prompt_hits=torch.zeros(N, dtype=torch.long),
            prompt_rows=64,
            decode_hits=hits[i],
            resident_steps=hits[i],
            decode_steps=fill,
            votes=hits[i].float(),
            recent_hits=hits[i],
            recent_steps=min(fill, 16),
        )
        torch.testing.assert_close(together[i], feedback_features(torch.zeros(N), one, torch.zeros(N), spec))


def test_version_2_needs_votes_and_unknown_versions_are_refused():
    with pytest.raises(ValueError, match="votes"):
        _features(FeedbackSpec(version=2), _counts(votes=None))
    with pytest.raises(ValueError, match="newer flashmemory"):
        FeedbackSpec(version=9)
