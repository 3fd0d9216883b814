"""Independent PyTorch reference of the fourteen kdgraph distillation losses, written from METHODS.md alone."""

# Conventions shared by every function below:
# - Inputs are NCHW maps or (B, D) vectors in float32 or float64; the result follows their dtype.
# - Teacher taps are detached inside each function (the teacher is frozen), so a teacher tensor
#   never receives a gradient; learned parameters are passed in explicitly (torch layouts:
#   Conv2d weight (out, in, kh, kw), Linear weight (out, in)) so that a test can copy them from
#   the ONNX graph's initializers and compare autograd gradients with ORT Training's.
# - Each method returns its UNWEIGHTED term as METHODS.md defines it (before gamma/alpha/beta).
# - A "BN params" dict holds bn_gamma, bn_beta, bn_mean, bn_var (and optionally bn_eps, default
#   1e-5). With bn_batch_stats=False BN uses the running statistics (the inference form the graph
#   writes); with True it uses the batch mean and biased batch variance (what ORT Training does).

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Params = Mapping[str, Any]
Pair = Tuple[Tensor, Tensor]

NORM_EPS = 1e-12  # N(x) = x / max(||x||_2, 1e-12)
BN_EPS = 1e-5  # torch BatchNorm2d default
RKD_DIST_EPS = 1e-12  # clamp of squared distances in RKD
PKT_EPS = 1e-7
CRD_EPS = 1e-7
CRD_FEAT_DIM = 128
VID_INIT_PRED_VAR = 5.0
VID_EPS = 1e-5
# log(exp(5.0 - 1e-5) - 1), the initial value of VID's log_scale.
VID_INIT_LOG_SCALE = math.log(math.exp(VID_INIT_PRED_VAR - VID_EPS) - 1.0)
OFD_CDF_CUTOFF = 1e-3


# ----------------------------------------------------------------------------- helpers


def l2n(x: Tensor, dim: int) -> Tensor:
    """N(x): x / max(||x||_2, 1e-12) along `dim` (identical to F.normalize)."""
    return x / torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min(NORM_EPS)


def pool_pair(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """Adaptive-average-pool the larger of two (square) NCHW maps to the other's size.

    a, b: NCHW maps compared by height as in the references; returns (a', b') with equal H, W.
    """
    ha, hb = a.shape[2], b.shape[2]
    if ha > hb:
        a = F.adaptive_avg_pool2d(a, tuple(b.shape[2:]))
    elif ha < hb:
        b = F.adaptive_avg_pool2d(b, tuple(a.shape[2:]))
    return a, b


def softplus(x: Tensor) -> Tensor:
    """Stable softplus, relu(x) + log(1 + exp(-|x|)) (the form the graph writes)."""
    return F.relu(x) + torch.log1p(torch.exp(-x.abs()))


def _stack_sum(terms: Sequence[Tensor]) -> Tensor:
    if not terms:
        raise ValueError("no pairs given")
    return torch.stack(list(terms)).sum()


def _chan(v: Tensor) -> Tensor:
    return v.reshape(1, -1, 1, 1)


def batch_norm(x: Tensor, p: Params, bn_batch_stats: bool = False) -> Tensor:
    """BatchNorm2d on x with the BN params dict p.

    bn_batch_stats: False = running stats (inference form); True = batch mean / biased variance.
    """
    eps = float(p.get("bn_eps", BN_EPS))
    if bn_batch_stats:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    else:
        mean, var = _chan(p["bn_mean"]), _chan(p["bn_var"])
    return (x - mean) / torch.sqrt(var + eps) * _chan(p["bn_gamma"]) + _chan(p["bn_beta"])


def regressor_kind(s_hw: Sequence[int], t_hw: Sequence[int]) -> str:
    """Which FitNet regressor METHODS.md prescribes for student size s_hw -> teacher size t_hw.

    Returns 'conv' (3x3/2 pad 1 when s_H == 2 t_H, else kernel (1+s_H-t_H, 1+s_W-t_W)) or
    'upsample' (2 s_H == t_H); raises ValueError otherwise. The checks run in the reference order.
    """
    s_h, t_h = int(s_hw[0]), int(t_hw[0])
    if s_h == 2 * t_h:
        return "conv"
    if 2 * s_h == t_h:
        return "upsample"
    if s_h >= t_h:
        return "conv"
    raise ValueError(f"no FitNet regressor for student size {tuple(s_hw)} -> teacher {tuple(t_hw)}")


def conv_regressor(
    f_s: Tensor,
    t_shape: Sequence[int],
    p: Params,
    kind: Optional[str] = None,
    relu: bool = True,
    bn_batch_stats: bool = False,
) -> Tensor:
    """FitNet regressor r(f_s): conv (with bias) -> BN(t_C) -> optional ReLU.

    f_s: student map (B, s_C, s_H, s_W); t_shape: teacher map shape (only C, H, W are used);
    p: {'weight', 'bias' (optional), BN params}; kind: None (= regressor_kind), 'conv' (stride and
    kernel by the METHODS.md rules, kernel checked against the weight), 'upsample' (nearest x2 then
    a stride-1 'same' conv with an odd kernel, the graph's form) or 'convtranspose' (the
    reference's ConvTranspose 4x4 stride 2 pad 1, weight (s_C, t_C, 4, 4)).
    """
    s_h, s_w = int(f_s.shape[2]), int(f_s.shape[3])
    t_c, t_h, t_w = (int(v) for v in t_shape[-3:])
    w, b = p["weight"], p.get("bias")
    if kind is None:
        kind = regressor_kind((s_h, s_w), (t_h, t_w))
    if kind == "conv":
        if s_h == 2 * t_h:
            if tuple(w.shape[2:]) != (3, 3):
                raise ValueError(f"s_H == 2 t_H needs a 3x3 stride-2 conv, got kernel {tuple(w.shape[2:])}")
            x = F.conv2d(f_s, w, b, stride=2, padding=1)
        elif s_h >= t_h:
            k = (1 + s_h - t_h, 1 + s_w - t_w)
            if tuple(w.shape[2:]) != k:
                raise ValueError(f"s_H >= t_H needs kernel {k}, got {tuple(w.shape[2:])}")
            x = F.conv2d(f_s, w, b)
        else:
            raise ValueError(f"'conv' regressor cannot map {s_h}x{s_w} to {t_h}x{t_w}")
    elif kind == "upsample":
        if 2 * s_h != t_h or 2 * s_w != t_w:
            raise ValueError(f"'upsample' regressor needs 2 s_H == t_H, got {s_h} -> {t_h}")
        kh, kw = int(w.shape[2]), int(w.shape[3])
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"'upsample' regressor expects an odd 'same' conv kernel, got {kh}x{kw}")
        x = f_s.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        x = F.conv2d(x, w, b, padding=(kh // 2, kw // 2))
    elif kind == "convtranspose":
        x = F.conv_transpose2d(f_s, w, b, stride=2, padding=1)
    else:
        raise ValueError(f"unknown regressor kind {kind!r}")
    if tuple(x.shape[1:]) != (t_c, t_h, t_w):
        raise ValueError(f"regressor output {tuple(x.shape[1:])} != teacher {(t_c, t_h, t_w)}")
    x = batch_norm(x, p, bn_batch_stats)
    return F.relu(x) if relu else x


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _conv1x1(x: Tensor, w: Tensor) -> Tensor:
    return F.conv2d(x, w.reshape(w.shape[0], w.shape[1], 1, 1))


# ----------------------------------------------------------------------------- CE and KD


def ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy. logits (B, K); labels (B,) int64 class indices."""
    return -F.log_softmax(logits, dim=1).gather(1, labels.reshape(-1, 1)).mean()


def kd(z_s: Tensor, z_t: Tensor, T: float = 4.0) -> Tensor:
    """Hinton KD, T^2/B * sum_b sum_k p_t (log p_t - log p_s). z_s, z_t: logits (B, K); T temperature."""
    z_t = z_t.detach()
    log_ps = F.log_softmax(z_s / T, dim=1)
    log_pt = F.log_softmax(z_t / T, dim=1)
    p_t = F.softmax(z_t / T, dim=1)
    return (p_t * (log_pt - log_ps)).sum() * (T * T) / z_s.shape[0]


# ----------------------------------------------------------------------------- 2. FitNet


def fitnet(f_s: Tensor, f_t: Tensor, regressor: Params, kind: Optional[str] = None, bn_batch_stats: bool = False) -> Tensor:
    """FitNet hint: mean over B*C*H*W of (relu(BN(conv(f_s))) - f_t)^2.

    f_s, f_t: hint maps (post-ReLU); regressor: conv weight/bias + BN params; kind, bn_batch_stats:
    see conv_regressor / batch_norm.
    """
    f_t = f_t.detach()
    r = conv_regressor(f_s, f_t.shape, regressor, kind=kind, relu=True, bn_batch_stats=bn_batch_stats)
    return ((r - f_t) ** 2).mean()


# ----------------------------------------------------------------------------- 3. AT


def at_map(f: Tensor, p: float = 2) -> Tensor:
    """A'(f) = N(reshape(mean_c f^p, (B, H*W))) per row."""
    return l2n(f.pow(p).mean(1).reshape(f.shape[0], -1), 1)


def at(pairs: Sequence[Pair], p: float = 2) -> Tensor:
    """Attention transfer: sum over pairs of mean_(b,j) (A'_s - A'_t)^2 after pooling.

    pairs: [(f_s, f_t)] post-ReLU stage ends; p: exponent (2).
    """
    terms = []
    for f_s, f_t in pairs:
        f_s, f_t = pool_pair(f_s, f_t.detach())
        terms.append((at_map(f_s, p) - at_map(f_t, p)).pow(2).mean())
    return _stack_sum(terms)


# ----------------------------------------------------------------------------- 4. SP


def sp(f_s: Tensor, f_t: Tensor) -> Tensor:
    """Similarity preserving: sum((N(G_t) - N(G_s))^2) / B^2 with G = Q Q^T. f_s, f_t: feat[-2] maps."""
    bsz = f_s.shape[0]
    q_s, q_t = _flat(f_s), _flat(f_t.detach())
    g_s = l2n(q_s @ q_s.t(), 1)
    g_t = l2n(q_t @ q_t.t(), 1)
    return ((g_t - g_s) ** 2).sum() / (bsz * bsz)


# ----------------------------------------------------------------------------- 5. CC


def cc(e_s_raw: Tensor, e_t_raw: Tensor, W_s: Tensor, b_s: Tensor, W_t: Tensor, b_t: Tensor) -> Tensor:
    """CC (RepDistiller): mean over i=0..B-2 of sum_d D[i,d] D[i+1,d], D = |e_s - e_t|.

    e_*_raw: feat[-1] (B, D_*); W_*, b_*: Linear(D_* -> 128) weight (128, D_*) and bias (both trainable).
    B >= 2 (with B = 1 the mean is over nothing; raises).
    """
    if e_s_raw.shape[0] < 2:
        raise ValueError("CC needs B >= 2 (it pairs adjacent samples)")
    e_s = F.linear(_flat(e_s_raw), W_s, b_s)
    e_t = F.linear(_flat(e_t_raw.detach()), W_t, b_t)
    d = (e_s - e_t).abs()
    return (d[:-1] * d[1:]).sum(1).mean()


# ----------------------------------------------------------------------------- 6. VID


def vid_init_log_scale(channels: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Initial log_scale of size t_C: log(exp(5.0 - 1e-5) - 1)."""
    return torch.full((channels,), VID_INIT_LOG_SCALE, dtype=dtype)


def vid(pairs: Sequence[Pair], regressors: Sequence[Sequence[Tensor]], log_scales: Sequence[Tensor]) -> Tensor:
    """VID: sum over pairs of mean 0.5 ((mu - f_t)^2 / var + log var), var = softplus(log_scale) + 1e-5.

    pairs: [(f_s, f_t)] post-ReLU stage ends (pooled first); regressors: per pair three bias-free
    1x1 conv weights (t_C, s_C[,1,1]), (t_C, t_C[,1,1]), (t_C, t_C[,1,1]) with ReLU between;
    log_scales: per pair (t_C,).
    """
    terms = []
    for (f_s, f_t), (w1, w2, w3), log_scale in zip(pairs, regressors, log_scales, strict=True):
        f_s, f_t = pool_pair(f_s, f_t.detach())
        mu = _conv1x1(F.relu(_conv1x1(F.relu(_conv1x1(f_s, w1)), w2)), w3)
        var = _chan(softplus(log_scale) + VID_EPS)
        terms.append((0.5 * ((mu - f_t) ** 2 / var + torch.log(var))).mean())
    return _stack_sum(terms)


# ----------------------------------------------------------------------------- 7. RKD


def rkd_distances(e: Tensor) -> Tensor:
    """Pairwise distances sqrt(max(|e_i|^2 + |e_j|^2 - 2 e_i.e_j, 1e-12)), diagonal 0, / off-diagonal mean.

    The squared distance is summed from e_i - e_j: the same number as METHODS.md's expansion,
    which cancels even in float64 when embeddings of norm ~7 lie 1e-6 apart (0.5% error).
    """
    bsz = e.shape[0]
    diff = e.unsqueeze(0) - e.unsqueeze(1)
    d = (diff * diff).sum(2).clamp_min(RKD_DIST_EPS).sqrt()
    d = d.masked_fill(torch.eye(bsz, dtype=torch.bool, device=e.device), 0.0)
    return d / (d.sum() / (bsz * bsz - bsz))


def rkd_angles(e: Tensor) -> Tensor:
    """angle[i, j, k] = <N(e_j - e_i), N(e_k - e_i)>, shape (B, B, B); 0 where j = i or k = i."""
    diff = e.unsqueeze(0) - e.unsqueeze(1)  # diff[i, j] = e_j - e_i
    n = l2n(diff, 2)
    return torch.bmm(n, n.transpose(1, 2))


def rkd(e_s: Tensor, e_t: Tensor, w_d: float = 25.0, w_a: float = 50.0) -> Tuple[Tensor, Tensor, Tensor]:
    """RKD: returns (w_d loss_d + w_a loss_a, loss_d, loss_a), smooth-L1 (beta 1, mean) on distances / angles.

    e_s, e_t: feat[-1] (B, D_*), B >= 2; the teacher side carries no gradient.
    """
    if e_s.shape[0] < 2:
        raise ValueError("RKD needs B >= 2")
    e_s, e_t = _flat(e_s), _flat(e_t.detach())
    loss_d = F.smooth_l1_loss(rkd_distances(e_s), rkd_distances(e_t), beta=1.0)
    loss_a = F.smooth_l1_loss(rkd_angles(e_s).reshape(-1), rkd_angles(e_t).reshape(-1), beta=1.0)
    return w_d * loss_d + w_a * loss_a, loss_d, loss_a


# ----------------------------------------------------------------------------- 8. PKT


def _pkt_prob(x: Tensor) -> Tensor:
    x = _flat(x)
    # ||x|| through vector_norm (whose gradient at a zero row is 0); sqrt(sum(x^2)) would give a
    # NaN gradient there, though the same forward value.
    x = x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + PKT_EPS)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    s = (x @ x.t() + 1.0) / 2.0
    return s / s.sum(1, keepdim=True)


def pkt(e_s: Tensor, e_t: Tensor) -> Tensor:
    """PKT: mean over B x B of Q log((Q + 1e-7) / (P + 1e-7)). e_s, e_t: feat[-1] (B, D_*)."""
    p = _pkt_prob(e_s)
    q = _pkt_prob(e_t.detach())
    return (q * torch.log((q + PKT_EPS) / (p + PKT_EPS))).mean()


# ----------------------------------------------------------------------------- 9. AB


def ab(
    pairs: Sequence[Pair],
    connectors: Optional[Sequence[Optional[Params]]] = None,
    margin: float = 1.0,
    bn_batch_stats: bool = False,
) -> Tensor:
    """AB init-stage loss: sum_i 2^(i-n+1) * l_i / B * 3/1000.

    pairs: [(s_pre, t_pre)] pre-ReLU stage ends; connectors: per pair None (identity; shapes must
    match) or a FitNet regressor dict without ReLU (may hold 'kind'); margin m (1).
    """
    n = len(pairs)
    if connectors is None:
        connectors = [None] * n
    bsz = pairs[0][0].shape[0]
    terms = []
    for i, ((s_pre, t_pre), conn) in enumerate(zip(pairs, connectors, strict=True)):
        t = t_pre.detach()
        if conn is None:
            if tuple(s_pre.shape) != tuple(t.shape):
                raise ValueError(f"identity AB connector needs equal shapes, got {tuple(s_pre.shape)} vs {tuple(t.shape)}")
            s = s_pre
        else:
            s = conv_regressor(s_pre, t.shape, conn, kind=conn.get("kind"), relu=False, bn_batch_stats=bn_batch_stats)
        neg = ((s > -margin) & (t <= 0)).to(s.dtype)
        pos = ((s <= margin) & (t > 0)).to(s.dtype)
        l_i = ((s + margin) ** 2 * neg + (s - margin) ** 2 * pos).sum()
        terms.append(2.0 ** (i - n + 1) * l_i / bsz * 3.0 / 1000.0)
    return _stack_sum(terms)


# ----------------------------------------------------------------------------- 10. FT


def ft_encode(f_t: Tensor, encoder: Sequence[Params]) -> Tensor:
    """Paraphraser encoder: three conv3x3 (pad 1, bias) each followed by LeakyReLU 0.1.

    encoder: [{'weight', 'bias'}] for C->C, C->C/2, C/2->C/2.
    """
    x = f_t
    for layer in encoder:
        x = F.leaky_relu(F.conv2d(x, layer["weight"], layer.get("bias"), padding=1), 0.1)
    return x


def convtranspose_to_conv_weight(w: Tensor) -> Tensor:
    """Weight of the Conv (pad 1) equal to a stride-1 pad-1 ConvTranspose 3x3 with weight w (in, out, 3, 3)."""
    return w.transpose(0, 1).flip(2, 3)


def ft_decode(factor: Tensor, decoder: Sequence[Params], decoder_as_conv: bool = False) -> Tensor:
    """Paraphraser decoder: three 3x3 stride-1 pad-1 transposed convs (bias) each followed by LeakyReLU 0.1.

    decoder: [{'weight', 'bias'}] for C/2->C/2, C/2->C, C->C; weights in ConvTranspose layout
    (in, out, 3, 3), or in Conv layout (out, in, 3, 3, flipped) when decoder_as_conv.
    """
    x = factor
    for layer in decoder:
        if decoder_as_conv:
            x = F.conv2d(x, layer["weight"], layer.get("bias"), padding=1)
        else:
            x = F.conv_transpose2d(x, layer["weight"], layer.get("bias"), stride=1, padding=1)
        x = F.leaky_relu(x, 0.1)
    return x


def ft_paraphraser_loss(f_t: Tensor, encoder: Sequence[Params], decoder: Sequence[Params], decoder_as_conv: bool = False) -> Tensor:
    """FT init stage: MSE(dec(enc(f_t)), f_t). f_t: teacher feat[-2]; encoder/decoder: see ft_encode/ft_decode."""
    f_t = f_t.detach()
    rec = ft_decode(ft_encode(f_t, encoder), decoder, decoder_as_conv)
    return ((rec - f_t) ** 2).mean()


def ft_translate(f_s: Tensor, translator: Sequence[Params], bn_batch_stats: bool = False) -> Tensor:
    """Translator: three conv3x3 (pad 1, bias) each followed by BN and LeakyReLU 0.1.

    translator: [{'weight', 'bias', BN params}] for s_C->s_C, s_C->t_C/2, t_C/2->t_C/2.
    """
    x = f_s
    for layer in translator:
        x = F.conv2d(x, layer["weight"], layer.get("bias"), padding=1)
        x = F.leaky_relu(batch_norm(x, layer, bn_batch_stats), 0.1)
    return x


def ft_factor(x: Tensor) -> Tensor:
    """phi(x) = N(reshape(mean_c x^2, (B, H*W))) per row."""
    return l2n(x.pow(2).mean(1).reshape(x.shape[0], -1), 1)


def ft(f_s: Tensor, f_t: Tensor, encoder: Sequence[Params], translator: Sequence[Params], bn_batch_stats: bool = False) -> Tensor:
    """FT main stage: mean |phi(translator(f_s)) - phi(enc(f_t))| after pooling; the encoder is frozen.

    f_s, f_t: feat[-2] maps; encoder: paraphraser encoder (no gradient); translator: see ft_translate.
    """
    with torch.no_grad():
        factor_t = ft_encode(f_t.detach(), encoder)
    factor_s = ft_translate(f_s, translator, bn_batch_stats)
    factor_s, factor_t = pool_pair(factor_s, factor_t)
    return (ft_factor(factor_s) - ft_factor(factor_t)).abs().mean()


# ----------------------------------------------------------------------------- 11. FSP


def fsp_matrices(maps: Sequence[Tensor]) -> list:
    """G_i = top bot^T / HW (B, C_{i+1}, C_i) for consecutive maps (bot, top), the larger pooled."""
    out = []
    for bot, top in zip(maps[:-1], maps[1:]):
        bot, top = pool_pair(bot, top)
        bsz = bot.shape[0]
        b = bot.reshape(bsz, bot.shape[1], -1)
        t = top.reshape(bsz, top.shape[1], -1)
        out.append(torch.bmm(t, b.transpose(1, 2)) / b.shape[2])
    return out


def fsp(s_maps: Sequence[Tensor], t_maps: Sequence[Tensor]) -> Tensor:
    """FSP: sum_i mean (G_s,i - G_t,i)^2. s_maps, t_maps: all spatial maps feat[:-1] (stem included).

    Raises ValueError when the counts or the channel counts differ position by position.
    """
    if len(s_maps) != len(t_maps) or len(s_maps) < 2:
        raise ValueError(f"FSP needs equally many (>= 2) maps, got {len(s_maps)} and {len(t_maps)}")
    for i, (a, b) in enumerate(zip(s_maps, t_maps)):
        if a.shape[1] != b.shape[1]:
            raise ValueError(f"FSP: channel counts differ at position {i}: student {a.shape[1]}, teacher {b.shape[1]}")
    g_s = fsp_matrices(s_maps)
    g_t = fsp_matrices([t.detach() for t in t_maps])
    return _stack_sum([((a - b) ** 2).mean() for a, b in zip(g_s, g_t)])


# ----------------------------------------------------------------------------- 12. NST


def _poly_kernel(a: Tensor, b: Tensor) -> Tensor:
    """K(a, b) = (b a^T)^2, (B, C_b, C_a)."""
    return torch.bmm(b, a.transpose(1, 2)) ** 2


def nst(pairs: Sequence[Pair]) -> Tensor:
    """NST (polynomial kernel): sum over pairs of mean K(t,t) + mean K(s,s) - 2 mean K(s,t).

    pairs: [(f_s, f_t)] post-ReLU stage ends; F = N(reshape(f, (B, C, HW))) along HW after pooling.
    """
    terms = []
    for f_s, f_t in pairs:
        f_s, f_t = pool_pair(f_s, f_t.detach())
        fs = l2n(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), 2)
        ft_ = l2n(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), 2)
        terms.append(_poly_kernel(ft_, ft_).mean() + _poly_kernel(fs, fs).mean() - 2.0 * _poly_kernel(fs, ft_).mean())
    return _stack_sum(terms)


# ----------------------------------------------------------------------------- 13. CRD


def crd_init_memory(n: int, dim: int = CRD_FEAT_DIM, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """A fresh memory (n, dim), uniform in +-1/sqrt(dim/3)."""
    stdv = 1.0 / math.sqrt(dim / 3.0)
    return torch.rand(n, dim, generator=generator, dtype=dtype) * (2.0 * stdv) - stdv


def crd_embed(x: Tensor, p: Params) -> Tensor:
    """Embed: Linear(D -> 128) then x / ||x||_2 with no eps. p: {'weight' (128, D), 'bias' (128,)}."""
    y = F.linear(_flat(x), p["weight"], p["bias"])
    return y / torch.linalg.vector_norm(y, dim=1, keepdim=True)


def crd_contrast_loss(x: Tensor, n_data: int) -> Tensor:
    """-(sum_b log(x_0/(x_0 + P + eps)) + sum_{b,k>=1} log(P/(x_k + P + eps))) / B, P = K/N, eps 1e-7.

    x: normalised scores (B, K+1), column 0 positive; n_data: N.
    """
    bsz, k1 = x.shape
    p = (k1 - 1) / float(n_data)
    x0 = x[:, 0]
    log_d1 = torch.log(x0 / (x0 + p + CRD_EPS))
    log_d0 = torch.log(p / (x[:, 1:] + p + CRD_EPS))
    return -(log_d1.sum() + log_d0.sum()) / bsz


def crd(
    e_s_raw: Tensor,
    e_t_raw: Tensor,
    embed_s: Params,
    embed_t: Params,
    mem_s: Tensor,
    mem_t: Tensor,
    index: Tensor,
    contrast_index: Tensor,
    Z: Any,
    N: Optional[int] = None,
    K: Optional[int] = None,
    tau: float = 0.07,
    momentum: float = 0.5,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """CRD: returns (loss(out_s) + loss(out_t), new mem_s, new mem_t, Z used = tensor [Z_s, Z_t]).

    e_*_raw: feat[-1] (B, D_*); embed_*: crd_embed params; mem_s / mem_t: (N, 128) student /
    teacher memories (no gradient); index (B,) int64; contrast_index (B, K+1) int64, column 0 =
    the sample; Z: [Z_s, Z_t], an entry < 0 is estimated here as mean(out)*N (no gradient);
    N, K: checked against the shapes when given; tau temperature; momentum of the memory update.
    """
    n_data = int(mem_s.shape[0]) if N is None else int(N)
    k_neg = int(contrast_index.shape[1]) - 1 if K is None else int(K)
    if mem_s.shape[0] != n_data or mem_t.shape[0] != n_data:
        raise ValueError(f"memories have {mem_s.shape[0]}/{mem_t.shape[0]} rows, N = {n_data}")
    if contrast_index.shape[1] != k_neg + 1:
        raise ValueError(f"contrast_index has {contrast_index.shape[1]} columns, K + 1 = {k_neg + 1}")
    e_s = crd_embed(e_s_raw, embed_s)
    e_t = crd_embed(e_t_raw.detach(), embed_t)
    mem_s, mem_t = mem_s.detach(), mem_t.detach()
    w_s = mem_s[contrast_index]  # (B, K+1, 128)
    w_t = mem_t[contrast_index]
    out_t = torch.exp(torch.bmm(w_s, e_t.unsqueeze(2)).squeeze(2) / tau)
    out_s = torch.exp(torch.bmm(w_t, e_s.unsqueeze(2)).squeeze(2) / tau)
    z_in = torch.as_tensor(Z, dtype=e_s.dtype, device=e_s.device).detach().reshape(2)
    z_s = (out_s.detach().mean() * n_data) if bool(z_in[0] < 0) else z_in[0]
    z_t = (out_t.detach().mean() * n_data) if bool(z_in[1] < 0) else z_in[1]
    loss = crd_contrast_loss(out_s / z_s, n_data) + crd_contrast_loss(out_t / z_t, n_data)
    with torch.no_grad():
        upd_s = momentum * mem_s[index] + (1.0 - momentum) * e_s
        upd_t = momentum * mem_t[index] + (1.0 - momentum) * e_t
        new_s = mem_s.index_copy(0, index, upd_s / torch.linalg.vector_norm(upd_s, dim=1, keepdim=True))
        new_t = mem_t.index_copy(0, index, upd_t / torch.linalg.vector_norm(upd_t, dim=1, keepdim=True))
    return loss, new_s, new_t, torch.stack([z_s, z_t])


# ----------------------------------------------------------------------------- 14. OFD


def ofd_margin(gamma: Tensor, beta: Tensor) -> Tensor:
    """Per-channel margin E[x | x < 0], x ~ N(beta, gamma^2), with the -3|gamma| cut-off.

    gamma, beta: (C,) weight and bias of the teacher BN that feeds the stage's ReLU.
    M = m - s phi(m/s) / Phi(-m/s) if Phi(-m/s) > 0.001 else -3 s, s = |gamma|, m = beta.
    (gamma = 0, outside the reference which divides by zero, gives beta if beta < 0 else 0.)
    """
    s = gamma.detach().to(torch.float64).abs()
    m = beta.detach().to(torch.float64)
    z = m / s
    cdf = torch.special.ndtr(-z)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    ok = cdf > OFD_CDF_CUTOFF
    margin = torch.where(ok, m - s * pdf / torch.where(ok, cdf, torch.ones_like(cdf)), -3.0 * s)
    return margin.to(gamma.dtype)


def ofd_margin_from_responses(t_pre: Tensor) -> Tensor:
    """Fallback margin (no BN): per channel mean of the negative entries of t_pre (B, C, H, W); 0 if none."""
    t = t_pre.detach()
    neg = (t < 0).to(t.dtype)
    return (t * neg).sum(dim=(0, 2, 3)) / neg.sum(dim=(0, 2, 3)).clamp_min(1.0)


def ofd(
    pairs: Sequence[Pair],
    connectors: Sequence[Params],
    margins: Sequence[Tensor],
    reduction: str = "batch",
    bn_batch_stats: bool = False,
    pool: bool = False,
) -> Tensor:
    """OFD: sum_i L_i / 2^(n-i-1), L_i = sum (c(s) - t')^2 1{c(s) > t' or t' > 0}, t' = max(t, M).

    pairs: [(s_pre, t_pre)] pre-ReLU stage ends (same H, W unless pool); connectors: per pair
    {'weight' (t_C, s_C, 1, 1), BN params} (conv1x1 no bias + BN); margins: per pair (t_C,);
    reduction: 'sum' (no batch factor), 'batch' (/ B, the term that beta = 1/1000 multiplies;
    default) or 'total' (/ B / 1000, the full CIFAR weighting); pool: where the sizes differ,
    the larger of c(s) and t is pooled to the smaller (after the connector, before the margin
    clip: the order kdgraph writes; the references only pair equal sizes, METHODS.md does not say).
    """
    n = len(pairs)
    bsz = pairs[0][0].shape[0]
    terms = []
    for i, ((s_pre, t_pre), conn, margin) in enumerate(zip(pairs, connectors, margins, strict=True)):
        t = t_pre.detach()
        if tuple(s_pre.shape[2:]) != tuple(t.shape[2:]) and not pool:
            raise ValueError(f"OFD pair {i}: spatial sizes differ, {tuple(s_pre.shape[2:])} vs {tuple(t.shape[2:])}")
        s = batch_norm(F.conv2d(s_pre, conn["weight"], conn.get("bias")), conn, bn_batch_stats)
        s, t = pool_pair(s, t)
        t = torch.maximum(t, _chan(margin.detach().to(t.dtype)))
        mask = ((s > t) | (t > 0)).to(s.dtype)
        terms.append(((s - t) ** 2 * mask).sum() / 2.0 ** (n - i - 1))
    total = _stack_sum(terms)
    if reduction == "sum":
        return total
    if reduction == "batch":
        return total / bsz
    if reduction == "total":
        return total / bsz / 1000.0
    raise ValueError(f"unknown OFD reduction {reduction!r}")
