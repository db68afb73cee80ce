"""The Linear that takes the cache's 16-bit rows as stored (unipt.train.stored_inputs)."""

from __future__ import annotations

import torch
from torch import nn

from unipt.train.methods.unipt.transformer import UniPTClassifier
from unipt.train.stored_inputs import StoredInputLinear


def _pair(width: int = 24, seed: int = 0) -> tuple[StoredInputLinear, nn.Linear]:
    torch.manual_seed(seed)
    stored = StoredInputLinear(width, 8)
    plain = nn.Linear(width, 8)
    plain.load_state_dict(stored.state_dict())  # same keys, same parameters
    return stored, plain


def _outputs_and_gradients_agree(rows: torch.Tensor, grad_atol: float) -> None:
    """``StoredInputLinear`` on 16-bit ``rows`` against ``nn.Linear`` on their float32 upcast."""
    stored, plain = _pair(rows.shape[-1])
    out, expected = stored(rows), plain(rows.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # each output row is nn.Linear's
    upstream = torch.randn_like(out)
    out.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(stored.weight.grad, plain.weight.grad, rtol=1e-5, atol=grad_atol)
    torch.testing.assert_close(stored.bias.grad, plain.bias.grad, rtol=1e-6, atol=1e-6)


def test_same_outputs_and_gradients_as_a_linear_on_the_upcast_rows():
    for dtype in (torch.float16, torch.bfloat16):
        _outputs_and_gradients_agree(torch.randn(3, 5, 24).to(dtype), grad_atol=1e-6)


def test_keeps_the_16_bit_rows_not_a_float32_copy_for_the_backward_pass():
    saved: list[torch.Tensor] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    rows = torch.randn(4, 6, 24).half()
    stored, plain = _pair()
    held = {}
    for name, layer, inputs in (("stored", stored, rows), ("plain", plain, rows.float())):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            layer(inputs).sum().backward()
        held[name] = [t.dtype for t in saved if t.numel() == rows.numel()]  # any view of the rows
    # nn.Linear keeps the float32 upcast of the rows; StoredInputLinear keeps the float16 rows themselves.
    assert held == {"stored": [torch.float16], "plain": [torch.float32]}


def test_unipt_trains_the_same_on_stored_fp16_rows_as_on_their_float32_upcast():
    torch.manual_seed(0)
    widths = [16, 16, 16]
    hidden = [torch.randn(4, 7, w).half() for w in widths]
    mask = torch.arange(7)[None, :] < torch.tensor([7, 5, 3, 6])[:, None]
    models = []
    for inputs in (hidden, [h.float() for h in hidden]):
        torch.manual_seed(1)
        model = UniPTClassifier(widths, num_classes=3, embed_size=16, downsample_factor=2, dropout=0.0)
        logits, weights = model(inputs, mask)
        nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 1])).backward()
        models.append((model, logits, weights))
    (a, logits_a, weights_a), (b, logits_b, weights_b) = models
    assert a.takes_stored_dtype
    assert torch.equal(logits_a, logits_b) and torch.equal(weights_a, weights_b)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_cpu_pieces_give_the_whole_layers_outputs_and_gradients():
    # Wide rows: several ~1 MB pieces on the CPU; the weight's gradient is summed piece by piece (float32
    # rounding in another order, nothing more).
    _outputs_and_gradients_agree(torch.randn(2, 300, 4096).half(), grad_atol=1e-4)


def test_one_malloc_arena_is_asked_for_at_import_unless_the_user_chose():
    import subprocess
    import sys

    code = "import unipt.train.allocator as a; print(a._done, a.use_one_malloc_arena())"
    run = [sys.executable, "-c", code]
    chose = subprocess.run(run, capture_output=True, text=True, env={"MALLOC_ARENA_MAX": "4"}, check=True)
    assert chose.stdout.split() == ["False", "False"]  # the user's MALLOC_ARENA_MAX wins
    fresh = subprocess.run(run, capture_output=True, text=True, env={}, check=True)
    assert fresh.stdout.split() == ["True", "False"]  # applied when train was imported, and only then


def test_freed_memory_goes_back_to_the_system_where_the_heap_kept_it():
    # 64 MiB of 64 KiB buffers (below glibc's mmap threshold: they come from the heap), every other one
    # freed: the holes sit between live buffers, so without a trim the process keeps their pages.
    import subprocess
    import sys

    code = """
import os
import unipt.train.allocator as a
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
kept = [bytearray(b"x" * 65536) for _ in range(1024)]
del kept[::2]
before = rss()
released = a.return_freed_memory()
print(released, round(before - rss()))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    released, freed_mib = run.stdout.split()
    assert released == "True" and int(freed_mib) >= 24, run.stdout
