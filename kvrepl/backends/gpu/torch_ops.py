"""The GPU path's kernels' contract in plain torch, for the tests of its logic on the CPU (no
invariance promised): the same calls as triton_ops.py, over plain or GGUF-block weights
(qweights.py, dequantized here as the Triton kernel dequantizes a tile)."""

from __future__ import annotations

from typing import Any

import torch

from kvrepl.backends.gpu.qweights import dense


def _attention(q, kc, vc, pos0, out, part, window, scale, softcap=0.0, *, ahead=None):
    """Each row's attention over its own positions (a window's last ones where given)."""
    m, p0 = q.shape[0], int(pos0[0])
    kvh, _, d = kc.shape
    g = out.shape[1] // d // kvh
    for r in range(m):
        lo = max(0, p0 + r - window + 1) if window else 0
        k, v = kc[:, lo : p0 + r + 1].float(), vc[:, lo : p0 + r + 1].float()
        qr = q[r, : out.shape[1]].view(kvh, g, d).float()
        sc = qr @ k.transpose(1, 2) * scale
        if softcap:
            sc = torch.tanh(sc / softcap) * softcap
        w = torch.softmax(sc, -1)
        out[r] = (w @ v).reshape(-1).to(out.dtype)
    return out


def torch_ops(computes: set[str]) -> Any:
    """The kernels' contract in plain torch (no invariance promised): for CPU tests."""

    def _norm(x, w, eps, out, ahead=None):
        v = x.float()
        y = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)).to(out.dtype)
        return out.copy_((w.float() * y.float()).to(out.dtype))

    class Ops:
        rmsnorm = staticmethod(_norm)

        @staticmethod
        def matmul(x, w, out, residual=None, *, glu=False):
            w = dense(w, x.dtype)
            if glu:
                f = out.shape[1]
                g, u = (x @ w[:f].T).to(out.dtype), (x @ w[f:].T).to(out.dtype)
                y = (torch.nn.functional.silu(g.float()) * u.float()).to(out.dtype)
            else:
                y = (x @ w.T).to(out.dtype)
            out.copy_(y if residual is None else (residual.float() + y.float()).to(out.dtype))
            return out

        @staticmethod
        def matmul_rope(x, w, q, cos_t, sin_t, kc, vc, pos0, heads, kv_heads):
            w = dense(w, x.dtype)
            qkv = (x @ w.T).to(q.dtype)
            m, d = qkv.shape[0], kc.shape[2]
            p = int(pos0[0])
            c, s = cos_t[p : p + m, None, :], sin_t[p : p + m, None, :]
            qk = qkv[:, : (heads + kv_heads) * d].view(m, heads + kv_heads, d).float()
            half = d // 2
            rot = torch.cat([-qk[..., half:], qk[..., :half]], -1)
            r = (qk * c + rot * s).to(qkv.dtype)
            q.copy_(r[:, :heads].reshape(m, -1))
            kc[:, p : p + m] = r[:, heads:].transpose(0, 1)
            vc[:, p : p + m] = qkv[:, (heads + kv_heads) * d :].view(m, kv_heads, d).transpose(0, 1)
            return q

        attention = staticmethod(_attention)

        @staticmethod
        def part_floats(rows, kv_heads, cap, g, d):
            return 1

    Ops.COMPUTES = computes | {"attention softcap"}
    return Ops
