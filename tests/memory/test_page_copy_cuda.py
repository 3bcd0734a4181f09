"""The Triton page copy from the pinned host mirror, against plain indexing (run on the GPU machine)."""

import pytest
import torch

pytestmark = pytest.mark.cuda


def reference(mirror, reserve, moves, page, sink):
    out = reserve.clone()
    for b, s in (moves >= 0).nonzero().tolist():
        p = int(moves[b, s])
        out[b, :, sink + s * page : sink + (s + 1) * page] = mirror[b, :, p * page : (p + 1) * page].cuda()
    return out


@pytest.mark.parametrize("programs", [1, 3, 16, 10_000])
@pytest.mark.parametrize(
    "b, h, d, page, sink, slots, dtype",
    [
        (1, 1, 16, 16, 0, 1, torch.float32),
        (3, 2, 40, 24, 5, 7, torch.float16),
        (2, 8, 128, 64, 16, 33, torch.bfloat16),
        (2, 4, 128, 128, 16, 5, torch.bfloat16),  # a page of one head larger than one block
    ],
)
def test_copy_pages_matches_indexing(b, h, d, page, sink, slots, dtype, programs):
    from flashmemory.memory.page_copy_triton import copy_pages

    gen = torch.Generator().manual_seed(b * 100 + slots)
    pages = 3 * slots + 2
    mirror = torch.randn(b, h, pages * page, d, generator=gen).to(dtype).pin_memory()
    reserve = torch.randn(b, h, sink + slots * page + 9, d, generator=gen).to(dtype).cuda()
    moves = torch.randint(-1, pages, (b, slots), generator=gen).cuda()
    moves[0, 0] = pages - 1  # the last page of the mirror
    want = reference(mirror, reserve, moves.cpu(), page, sink)
    copy_pages(mirror, reserve, moves, page, sink, programs=programs)
    assert torch.equal(reserve, want)


def test_copy_pages_from_a_mirror_shared_by_the_batch_on_a_side_stream():
    """A batch stride of 0 (one mirror expanded over the batch), enqueued on another stream."""
    from flashmemory.memory.page_copy_triton import copy_pages

    mirror = torch.randn(1, 2, 8 * 16, 32).pin_memory()
    reserve = torch.zeros(4, 2, 4 * 16, 32, device="cuda")
    moves = torch.tensor([[7, -1, 0, 3]] * 4, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        copy_pages(mirror.expand(4, -1, -1, -1), reserve, moves, 16, 0)
    torch.cuda.current_stream().wait_stream(side)
    want = reference(mirror.expand(4, -1, -1, -1), torch.zeros_like(reserve), moves.cpu(), 16, 0)
    assert torch.equal(reserve, want)


def test_copy_pages_refuses_zero_programs():
    from flashmemory.memory.page_copy_triton import copy_pages

    with pytest.raises(ValueError, match="programs"):
        empty = torch.zeros(1, 1, 16, 8)
        copy_pages(empty, empty.clone(), torch.zeros(1, 1, dtype=torch.long), 16, 0, programs=0)
