"""Signal-processing kernels: DFT, STFT, the Hann, Hamming and Blackman windows,
MelWeightMatrix, and two causal filters that carry a state from call to call:
CausalConvWithState (a depthwise FIR filter) and LinearAttention (a linear recurrence).

Complex tensors are real tensors with a last dimension of 2 (real, imaginary); real
signals may come with a last dimension of 1. Transforms compute in complex64 for float32
and narrower inputs (numpy's FFT keeps single precision), complex128 for float64, and
return the input's float type.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, helper

from onnxgrad.runtime.kernels import KernelNode
from onnxgrad.runtime.kernels.sequence import kernel_if_missing


def _scalar(value) -> int:
    return int(np.asarray(value).reshape(-1)[0])


def _complex(x: np.ndarray) -> np.ndarray:
    """[..., 1] (real) or [..., 2] (real, imaginary) as a complex array of shape [...]."""
    ctype = np.complex128 if x.dtype == np.float64 else np.complex64
    z = x[..., 0].astype(ctype)
    if x.shape[-1] == 2:
        z.imag = x[..., 1]
    return z


def _stack(z: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A complex array as [..., 2] (real, imaginary) of `dtype`; a real one as [..., 1]."""
    if not np.iscomplexobj(z):
        return z[..., None].astype(dtype)
    return np.stack([z.real, z.imag], axis=-1).astype(dtype)


def dft(z: np.ndarray, axis: int, length: int | None, inverse: bool, onesided: bool):
    """The DFT (or inverse, scaled by 1/n) of complex `z` along `axis`; the signal is cut or
    zero-padded to `length`; onesided keeps the n // 2 + 1 non-redundant bins.

    An inverse onesided transform reads those bins of a real signal's spectrum and returns
    the real signal (of `length`, default 2 · (bins − 1)).
    """
    if inverse and onesided:
        n = 2 * (z.shape[axis] - 1) if length is None else length
        return np.fft.irfft(z, n=n, axis=axis)
    n = z.shape[axis] if length is None else length
    out = np.fft.ifft(z, n=n, axis=axis) if inverse else np.fft.fft(z, n=n, axis=axis)
    if onesided:
        out = np.take(out, np.arange(n // 2 + 1), axis=axis)
    return out


@kernel_if_missing("DFT")
def dft_(node: KernelNode):
    """DFT: axis as an attribute (opset 17, default 1) or an input (opset 20, default −2,
    counted over the input's rank including the complex dimension)."""
    inverse = bool(node.attrs.get("inverse", 0))
    onesided = bool(node.attrs.get("onesided", 0))
    attr_axis = node.attrs.get("axis", 1)

    def run(x, dft_length=None, axis=None):
        if node.opset >= 20:
            a = -2 if axis is None else _scalar(axis)
            a = a % x.ndim
        else:
            a = attr_axis % x.ndim
        length = None if dft_length is None else _scalar(dft_length)
        return (_stack(dft(_complex(x), a, length, inverse, onesided), x.dtype),)

    return run


@kernel_if_missing("STFT")
def stft(node: KernelNode):
    """STFT: the DFT of each windowed frame, frames `frame_step` apart; output
    [batch, frames, bins, 2]."""
    onesided = bool(node.attrs.get("onesided", 1))

    def run(signal, frame_step, window=None, frame_length=None):
        z = _complex(signal)
        step = _scalar(frame_step)
        if frame_length is not None:
            length = _scalar(frame_length)
        elif window is not None:
            length = window.shape[0]
        else:
            length = z.shape[1]
        frames = (z.shape[1] - length) // step + 1
        starts = np.arange(frames) * step
        index = starts[:, None] + np.arange(length)[None, :]
        framed = z[:, index]  # [batch, frames, length]
        if window is not None:
            framed = framed * window.astype(np.float64)
        return (_stack(dft(framed, 2, None, False, onesided), signal.dtype),)

    return run


def _window(terms: tuple[float, ...]):
    """A factory for the cosine-sum window Σₖ (−1)ᵏ aₖ cos(2πkn / N), with N the size
    (periodic) or the size − 1 (symmetric)."""

    def factory(node: KernelNode):
        periodic = node.attrs.get("periodic", 1)
        dtype = helper.tensor_dtype_to_np_dtype(
            node.attrs.get("output_datatype", TensorProto.FLOAT)
        )

        def run(size):
            n = _scalar(size)
            denominator = n if periodic else n - 1
            phase = 2 * math.pi * np.arange(n, dtype=np.float64) / max(denominator, 1)
            w = np.zeros(n, dtype=np.float64)
            for k, a in enumerate(terms):
                w += (-1) ** k * a * np.cos(k * phase)
            return (w.astype(dtype),)

        return run

    return factory


kernel_if_missing("HannWindow")(_window((0.5, 0.5)))
kernel_if_missing("HammingWindow")(_window((25 / 46, 21 / 46)))
kernel_if_missing("BlackmanWindow")(_window((0.42, 0.5, 0.08)))


@kernel_if_missing("MelWeightMatrix")
def mel_weight_matrix(node: KernelNode):
    """MelWeightMatrix [dft_length // 2 + 1, num_mel_bins]: triangles peaking at 1 between
    points evenly spaced on the mel scale, mel(f) = 2595 · log10(1 + f / 700)."""
    dtype = helper.tensor_dtype_to_np_dtype(node.attrs.get("output_datatype", TensorProto.FLOAT))

    def run(num_mel_bins, dft_length, sample_rate, lower_edge_hertz, upper_edge_hertz):
        bins, length = _scalar(num_mel_bins), _scalar(dft_length)
        rate = _scalar(sample_rate)
        low, high = (
            float(np.asarray(v).reshape(-1)[0]) for v in (lower_edge_hertz, upper_edge_hertz)
        )

        # 1. num_mel_bins + 2 points from the lower edge, spaced by the mel range / their count
        #    (the spec's reference spacing), mapped back to hertz and to spectrogram bins.
        mel_low = 2595 * math.log10(1 + low / 700)
        mel_high = 2595 * math.log10(1 + high / 700)
        count = bins + 2
        mels = mel_low + np.arange(count) * (mel_high - mel_low) / count
        hertz = 700 * (np.power(10.0, mels / 2595) - 1)
        points = np.floor((length + 1) * hertz / rate).astype(np.int64)

        # 2. One triangle per mel bin: up from the left point to the centre, down to the right.
        out = np.zeros((length // 2 + 1, bins), dtype=np.float64)
        for i in range(bins):
            left, centre, right = points[i], points[i + 1], points[i + 2]
            if centre == left:
                out[centre, i] = 1.0
            else:
                j = np.arange(left, centre + 1)
                out[j, i] = (j - left) / (centre - left)
            if right > centre:
                j = np.arange(centre, right)
                out[j, i] = (right - j) / (right - centre)
        return (out.astype(dtype),)

    return run


# Causal filters over time with a carried state (opset 27).


@kernel_if_missing("CausalConvWithState")
def causal_conv_with_state(node: KernelNode):
    """CausalConvWithState: a depthwise causal 1-D convolution of (B, C, L) with weight
    (C, 1, k), after the carried (B, C, k − 1) state (zeros when absent); optional bias and
    SiLU; the new state is the last k − 1 positions of state + input."""
    activation = node.attrs.get("activation", "none")
    if activation not in ("none", "silu", "swish"):
        raise NotImplementedError(f"CausalConvWithState activation '{activation}'")

    def run(x, weight, bias=None, past_state=None):
        b, c, length = x.shape
        k = weight.shape[2]
        if past_state is None:
            past_state = np.zeros((b, c, k - 1), dtype=x.dtype)
        padded = np.concatenate([past_state, x], axis=2)
        wide = padded.astype(np.float64)
        w = weight[:, 0, :].astype(np.float64)
        # out[b, c, t] = Σ_j w[c, j] · padded[b, c, t + j]
        out = np.zeros((b, c, length))
        for j in range(k):
            out += w[None, :, j, None] * wide[:, :, j : j + length]
        if bias is not None:
            out += bias.astype(np.float64)[None, :, None]
        out = out.astype(x.dtype)
        if activation != "none":
            wide_out = out.astype(np.float32)
            out = (wide_out / (1.0 + np.exp(-wide_out))).astype(x.dtype)
        return out, padded[:, :, length:]

    return run


_RULES = ("linear", "gated", "delta", "gated_delta")


def _per_head(t: np.ndarray, heads: int) -> np.ndarray:
    """(B, T, H · D) → (B, H, T, D)."""
    b, steps, width = t.shape
    return t.reshape(b, steps, heads, width // heads).transpose(0, 2, 1, 3)


@kernel_if_missing("LinearAttention")
def linear_attention(node: KernelNode):
    """LinearAttention: per KV head a (d_k, d_v) state S updated token by token,
    S ← exp(g) · S (gated rules), v ← β · (v − Sᵀk) (delta rules), S ← S + k ⊗ v, and the
    output scale · qᵀS, query heads sharing their group's KV head; in float32."""
    rule = node.attrs.get("update_rule", "gated_delta")
    if rule not in _RULES:
        raise NotImplementedError(f"LinearAttention update_rule '{rule}'")
    gated, delta = rule.startswith("gated"), rule.endswith("delta")
    q_heads, kv_heads = node.attrs["q_num_heads"], node.attrs["kv_num_heads"]
    scale_attr = node.attrs.get("scale", 0.0)

    def run(query, key, value, past_state=None, decay=None, beta=None):
        if gated and decay is None or delta and beta is None:
            raise ValueError(f"update_rule '{rule}' needs the decay/beta inputs it names")
        f32 = np.float32
        q = _per_head(query.astype(f32), q_heads)
        k = _per_head(key.astype(f32), kv_heads)
        v = _per_head(value.astype(f32), kv_heads)
        b, _, steps, d_k = q.shape
        d_v = v.shape[-1]
        group = q_heads // kv_heads
        # decay: one log-factor per head (B, T, H) or per key dimension (B, T, H · d_k).
        g = None if decay is None else _per_head(decay.astype(f32), kv_heads)
        # beta: per head (B, T, H) or one for all heads (B, T, 1).
        r = None if beta is None else beta.astype(f32).transpose(0, 2, 1)[..., None]
        if past_state is None:
            state = np.zeros((b, kv_heads, d_k, d_v), f32)
        else:
            state = past_state.astype(f32)
        scale = scale_attr if scale_attr else 1.0 / np.sqrt(d_k)
        out = np.zeros((b, q_heads, steps, d_v), f32)
        for t in range(steps):
            k_t, v_t = k[:, :, t], v[:, :, t]
            if gated:
                state = state * np.exp(g[:, :, t])[..., None]
            if delta:
                recalled = np.einsum("bhde,bhd->bhe", state, k_t)
                v_t = r[:, :, t] * (v_t - recalled)
            state = state + k_t[..., :, None] * v_t[..., None, :]
            shared = np.repeat(state, group, axis=1) if group > 1 else state
            out[:, :, t] = f32(scale) * np.einsum("bhd,bhde->bhe", q[:, :, t], shared)
        output = out.transpose(0, 2, 1, 3).reshape(b, steps, q_heads * d_v)
        state_dtype = query.dtype if past_state is None else past_state.dtype
        return output.astype(query.dtype), state.astype(state_dtype)

    return run
