"""Token compression against a slow per-window reference loop written from the formula."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.compress import Compression, compress_tokens


def _reference(tokens: torch.Tensor, spec: Compression) -> torch.Tensor:
    """One window at a time, in float64, straight from the docstring's formula."""
    b, T, h, w, d = tokens.shape
    ft, fh, fw = spec.factors
    out = []
    for bi in range(b):
        clip = []
        for ti in range(T // ft):
            for hi in range(h // fh):
                for wi in range(w // fw):
                    win = tokens[bi, ti * ft:(ti + 1) * ft, hi * fh:(hi + 1) * fh, wi * fw:(wi + 1) * fw]
                    win = win.reshape(-1, d).double()
                    if spec.method == "avg":
                        clip.append(win.mean(0))
                        continue
                    norms = [math.sqrt(float((x * x).sum())) for x in win]
                    mean = sum(norms) / len(norms)
                    logits = [n / mean / spec.temperature for n in norms]
                    top = max(logits)
                    e = [math.exp(v - top) for v in logits]
                    weights = [v / sum(e) for v in e]
                    clip.append(sum(wt * x for wt, x in zip(weights, win)))
        out.append(torch.stack(clip))
    return torch.stack(out)


def _tokens(shape=(2, 8, 4, 6, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    # Per-token scales spread the norms, as real activations are (some tokens far louder).
    return torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g).mul(3).add(0.2)


@pytest.mark.parametrize("method", ["wap", "avg"])
@pytest.mark.parametrize("factors", [(4, 2, 2), (2, 1, 3), (1, 1, 1), (8, 4, 6)])
def test_matches_reference_loop(method, factors):
    tokens = _tokens()
    spec = Compression(method, factors)
    out = compress_tokens(tokens, spec)
    T, h, w = tokens.shape[1:4]
    assert out.shape == (2, spec.tokens((T, h, w)), 16)
    torch.testing.assert_close(out.double(), _reference(tokens, spec), rtol=1e-5, atol=1e-5)


def test_wap_equals_average_for_equal_activations():
    tokens = _tokens()
    unit = tokens / torch.linalg.vector_norm(tokens, dim=-1, keepdim=True)  # every token has norm 1
    for spec_factors in [(4, 2, 2), (2, 2, 3)]:
        wap = compress_tokens(unit * 7.0, Compression("wap", spec_factors))
        avg = compress_tokens(unit * 7.0, Compression("avg", spec_factors))
        torch.testing.assert_close(wap, avg, rtol=1e-6, atol=1e-6)


def test_wap_differs_from_average_and_favours_loud_tokens():
    tokens = _tokens()
    spec = Compression("wap", (4, 2, 2))
    wap, avg = compress_tokens(tokens, spec), compress_tokens(tokens, Compression("avg", (4, 2, 2)))
    assert (wap - avg).abs().max() > 1e-2
    # One window: a single token 10x louder than the rest pulls the WAP result towards it.
    win = torch.ones(1, 4, 2, 2, 8)
    win[0, 0, 0, 0] = -10.0
    loud = compress_tokens(win, spec)[0, 0]
    quiet = compress_tokens(win, Compression("avg", (4, 2, 2)))[0, 0]
    assert (loud < quiet).all() and (loud < 0).all()


def test_wap_weights_do_not_depend_on_feature_scale_and_temperature_tends_to_average():
    tokens = _tokens()
    spec = Compression("wap", (4, 2, 2))
    torch.testing.assert_close(compress_tokens(tokens * 100, spec), compress_tokens(tokens, spec) * 100,
                               rtol=1e-4, atol=1e-4)
    flat = compress_tokens(tokens, Compression("wap", (4, 2, 2), temperature=1e6))
    torch.testing.assert_close(flat, compress_tokens(tokens, Compression("avg", (4, 2, 2))), rtol=1e-4, atol=1e-5)


def test_token_order_is_time_then_rows_then_columns():
    # Each token's value is its own (t, h, w) window id, so the output order is visible.
    T, h, w = 8, 4, 4
    t_idx, h_idx, w_idx = torch.meshgrid(torch.arange(T) // 4, torch.arange(h) // 2, torch.arange(w) // 2,
                                         indexing="ij")
    ids = (t_idx * 4 + h_idx * 2 + w_idx).float()
    tokens = ids[None, ..., None].expand(1, T, h, w, 3)
    for method in ("avg", "wap"):
        out = compress_tokens(tokens, Compression(method, (4, 2, 2)))
        assert out[0, :, 0].tolist() == [float(i) for i in range(8)]


def test_zero_tokens_stay_finite_and_dtype_is_kept():
    out = compress_tokens(torch.zeros(1, 4, 2, 2, 4), Compression())
    assert torch.isfinite(out).all() and (out == 0).all()
    half = compress_tokens(_tokens().to(torch.bfloat16), Compression())
    assert half.dtype == torch.bfloat16


def test_bad_shapes_and_specs_are_clear_errors():
    with pytest.raises(ValueError, match="6 frames is not a multiple of 4"):
        compress_tokens(torch.zeros(1, 6, 4, 4, 8), Compression())
    with pytest.raises(ValueError, match="5 rows is not a multiple of 2"):
        compress_tokens(torch.zeros(1, 4, 5, 4, 8), Compression())
    with pytest.raises(ValueError, match=r"\[B, T, h, w, D\]"):
        compress_tokens(torch.zeros(4, 4, 4, 8), Compression())
    with pytest.raises(ValueError, match="method"):
        Compression("max")
    with pytest.raises(ValueError, match="factors"):
        Compression("wap", (4, 0, 2))
    assert Compression(factors=[4, 2, 2]).factors == (4, 2, 2)
    assert Compression().output_grid((4, 16, 16)) == (1, 8, 8) and Compression().tokens((4, 16, 16)) == 64
