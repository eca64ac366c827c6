"""SAM's mask decoder for one prompt, computed with fewer operations (same results).

segment_anything's MaskDecoder projects all h x w image positions through the
query, key, value and output matrices of every cross-attention, although the
other side of each attention holds only a handful of prompt tokens. Attention
is linear in those projections, so they can be moved to the token side:

- tokens attending to the image: q.(Wk x + bk) = (Wk^T q).x + q.bk (q.bk is the
  same for every position, so the softmax drops it), and the attention-weighted
  values are Wv (sum_j a_j x_j) + bv (the weights sum to 1);
- the image attending to tokens: (Wq x + bq).k = x.(Wq^T k) + bq.k, and the
  output projection is applied to the few value vectors before the weighting.

Per cross-attention this replaces two (h*w x C x C/2) products by two
(h*w x C x heads*tokens) ones: LiteMedSAM's decoder (64 x 64 image tokens, 8
heads, 7 tokens) does about half the arithmetic. The output upscaling is the
same two transposed convolutions, written as per-pixel matrix products over
blocks of positions (small temporaries: the whole-map version ran ~2.5x slower
on a CPU), and only the single mask that multimask_output=False returns is formed.
Measured on a 2-core CPU: 63 ms -> ~30 ms per decode with LiteMedSAM.

The weights are read from the modules of the model given; nothing is copied.
`decode_single_mask` equals `mask_decoder(..., multimask_output=False)`: to 1e-9
in float64 (tested against segment_anything's own forward), to rounding in float32
(LiteMedSAM's logits within 3e-5).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _heads(x: Tensor, n: int) -> Tensor:
    """(T, n*d) -> (n, T, d)."""
    return x.view(x.shape[0], n, -1).transpose(0, 1)


def tokens_to_image(attn, q_tokens: Tensor, k_image: Tensor, v_image: Tensor) -> Tensor:
    """attn(q=q_tokens, k=k_image, v=v_image) for T tokens (T, C) and N image positions (N, C)."""
    n = attn.num_heads
    d = attn.internal_dim // n
    q = _heads(attn.q_proj(q_tokens), n)                                   # (n, T, d)
    wk = attn.k_proj.weight.view(n, d, -1)                                 # (n, d, C)
    T = q_tokens.shape[0]
    # Heads and tokens stacked as rows of 2-D products: no broadcast copies of the image side.
    # q . bk is the same for every image position: the softmax over positions ignores it.
    folded = torch.matmul(q, wk).reshape(n * T, -1) / math.sqrt(d)         # (n*T, C)
    logits = torch.mm(folded, k_image.t()).view(n, T, -1)                  # (n, T, N)
    weights = torch.softmax(logits, dim=-1)
    pooled = torch.mm(weights.view(n * T, -1), v_image).view(n, T, -1)     # (n, T, C)
    wv = attn.v_proj.weight.view(n, d, -1)                                 # (n, d, C)
    v = torch.matmul(pooled, wv.transpose(1, 2)) + attn.v_proj.bias.view(n, 1, d)   # (n, T, d)
    return attn.out_proj(v.transpose(0, 1).reshape(T, n * d))


def image_to_tokens(attn, q_image: Tensor, k_tokens: Tensor, v_tokens: Tensor, residual: Tensor) -> Tensor:
    """residual + attn(q=q_image, k=k_tokens, v=v_tokens) for N image positions (N, C) and
    T tokens (T, C)."""
    n = attn.num_heads
    d = attn.internal_dim // n
    T = k_tokens.shape[0]
    k = _heads(attn.k_proj(k_tokens), n)                                   # (n, T, d)
    v = _heads(attn.v_proj(v_tokens), n)                                   # (n, T, d)
    wq = attn.q_proj.weight.view(n, d, -1)                                 # (n, d, C)
    scale = 1.0 / math.sqrt(d)
    folded = torch.matmul(k, wq).reshape(n * T, -1) * scale                # (n*T, C)
    bias = torch.matmul(k, attn.q_proj.bias.view(n, d, 1)).reshape(n * T, 1) * scale   # bq . k
    # Logits laid out (head, token, position): the softmax over the few tokens then runs
    # along a middle axis, much faster than over a short last axis.
    logits = torch.addmm(bias, folded, q_image.t()).view(n, T, -1)         # (n, T, N)
    weights = torch.softmax(logits, dim=1).reshape(n * T, -1)
    wo = attn.out_proj.weight.view(-1, n, d)                               # (C, n, d)
    v_out = torch.einsum("ntd,cnd->ntc", v, wo).reshape(n * T, -1)         # (n*T, C)
    # Each head's weights sum to 1, so the output bias can ride on the value vectors (1/n each).
    v_out = v_out + attn.out_proj.bias / n
    return torch.addmm(residual, weights.t(), v_out)                       # (N, C)


def _two_way_block(layer, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor):
    """One TwoWayAttentionBlock."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries[None], k=queries[None], v=queries[None])[0]
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q[None], k=q[None], v=queries[None])[0]
    queries = layer.norm1(queries)
    k = keys + key_pe                       # keys do not change before the image-to-token attention
    queries = layer.norm2(queries + tokens_to_image(layer.cross_attn_token_to_image, queries + query_pe, k, keys))
    queries = layer.norm3(queries + layer.mlp(queries))
    keys = layer.norm4(image_to_tokens(layer.cross_attn_image_to_token, k, queries + query_pe, queries, keys))
    return queries, keys


# Low-resolution logit given to the cells left out of a decoding window (SAM's own logits
# far from a box prompt are of this order; anything below the mask threshold is background).
OUTSIDE_LOGIT = -20.0
BLOCK_ROWS = 1024      # image positions per block of the upscaling (its temporaries stay in cache)


def _upscale_single(mask_decoder, keys: Tensor, h: int, w: int, hyper: Tensor) -> Tensor:
    """hyper . output_upscaling(keys as a (C, h, w) map), as a (4h, 4w) map."""
    up = mask_decoder.output_upscaling
    conv1, norm, act1, conv2, act2 = up[0], up[1], up[2], up[3], up[4]
    c1 = conv1.weight.shape[1]
    c2 = conv2.weight.shape[1]
    # A stride-2, 2x2 transposed convolution is a per-pixel product into 4 sub-pixels.
    w1 = conv1.weight.permute(0, 2, 3, 1).reshape(keys.shape[1], 4 * c1)
    w2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
    b1, b2 = conv1.bias.repeat(4), conv2.bias.repeat(4)
    m = keys.new_empty(keys.shape[0], 16)
    # Every position is upscaled on its own: blocks of positions keep the temporaries (16 output
    # pixels x 32 channels per position) small; one whole-map pass ran ~2.5x slower on a CPU.
    for s in range(0, keys.shape[0], BLOCK_ROWS):
        z = torch.addmm(b1, keys[s:s + BLOCK_ROWS], w1).view(-1, 4, c1)
        z = act1(F.layer_norm(z, (c1,), norm.weight, norm.bias, norm.eps))
        z = act2(torch.addmm(b2, z.view(-1, c1), w2)).view(-1, 4, c2)
        m[s:s + BLOCK_ROWS] = torch.matmul(z, hyper).view(-1, 16)
    # Sub-pixel (i1, j1) of the first convolution, then (i2, j2) of the second.
    m = m.view(h, w, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5)
    return m.reshape(4 * h, 4 * w)


def positions_as_rows(image_pe: Tensor) -> Tensor:
    """SAM's dense positional encoding (1, C, h, w) as (h*w, C) rows, contiguous (the layout
    decode_single_mask works in; the same for every decode, so a caller may keep it)."""
    C = image_pe.shape[1]
    return image_pe[0].reshape(C, -1).t().contiguous()


def decode_single_mask(mask_decoder, image_embedding: Tensor, image_pe: Tensor, sparse: Tensor,
                       dense: Tensor, window: Optional[Tuple[int, int, int, int]] = None,
                       outside: float = OUTSIDE_LOGIT, key_pe: Optional[Tensor] = None,
                       attend: Optional[Tuple[int, int, int, int]] = None) -> Tuple[Tensor, Tensor]:
    """mask_decoder(image_embedding (1, C, h, w; float16 is taken exactly), image_pe, sparse (1, P, C),
    dense (1, C, h, w), multimask_output=False): low-resolution logits (1, 1, 4h, 4w) and predicted IoU (1, 1).

    window: (row0, row1, col0, col1), embedding cells (half-open): only these cells are
    upscaled; the logits elsewhere are `outside`. The transformer still sees every cell.
    key_pe: positions_as_rows(image_pe), when the caller keeps it.
    attend: (row0, row1, col0, col1), embedding cells (half-open): the transformer sees only these
    (segment_anything's decoder given the embedding, positions and dense prompt cut to them); the
    logits elsewhere are `outside`. An approximation: the prompt tokens attend over fewer cells.
    """
    if attend is not None and tuple(attend) != (0, image_embedding.shape[-2], 0, image_embedding.shape[-1]):
        return _decode_attending(mask_decoder, image_embedding, image_pe, sparse, dense, window, outside,
                                 key_pe, attend)
    _, C, h, w = image_embedding.shape
    transformer = mask_decoder.transformer
    tokens = torch.cat([mask_decoder.iou_token.weight, mask_decoder.mask_tokens.weight, sparse[0]], 0)
    # Positions as rows, contiguous: every later product, sum and norm runs on this layout. The sum
    # (with the embedding's float16 -> float32, exact) in the channels-first layout both inputs are
    # stored in, then one transposing copy: the same values as a sum written straight into the rows,
    # whose strided reads of both inputs took 2.5 x as long with a mask prompt's dense map (9.4 ->
    # 3.8 ms on one CPU thread; 4.5 -> 3.5 ms with the constant no-mask map).
    keys = torch.add(image_embedding[0].reshape(C, h * w), dense[0].reshape(C, h * w)).t().contiguous()   # (N, C)
    key_pe = positions_as_rows(image_pe) if key_pe is None else key_pe
    queries = tokens
    for layer in transformer.layers:
        queries, keys = _two_way_block(layer, queries, keys, tokens, key_pe)
    attn = tokens_to_image(transformer.final_attn_token_to_image, queries + tokens, keys + key_pe, keys)
    queries = transformer.norm_final_attn(queries + attn)
    hyper = mask_decoder.output_hypernetworks_mlps[0](queries[1])          # the first mask token
    if window is None or tuple(window) == (0, h, 0, w):
        low = _upscale_single(mask_decoder, keys, h, w, hyper)
    else:
        r0, r1, c0, c1 = window
        if not (0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w):
            raise ValueError("window %s is not inside the %d x %d embedding" % (window, h, w))
        inside = keys.view(h, w, C)[r0:r1, c0:c1].reshape(-1, C)
        low = keys.new_full((4 * h, 4 * w), outside)
        low[4 * r0:4 * r1, 4 * c0:4 * c1] = _upscale_single(mask_decoder, inside, r1 - r0, c1 - c0, hyper)
    iou = mask_decoder.iou_prediction_head(queries[0])[:1]
    return low[None, None], iou[None]


def _decode_attending(mask_decoder, image_embedding, image_pe, sparse, dense, window, outside, key_pe, attend):
    """decode_single_mask with the transformer given only the cells of `attend` (half-open rows, cols)."""
    _, C, h, w = image_embedding.shape
    a0, a1, b0, b1 = attend
    if not (0 <= a0 < a1 <= h and 0 <= b0 < b1 <= w):
        raise ValueError("attention window %s is not inside the %d x %d embedding" % (attend, h, w))
    key_pe = positions_as_rows(image_pe) if key_pe is None else key_pe
    sub_pe = key_pe.view(h, w, C)[a0:a1, b0:b1].reshape(-1, C)
    cut = (slice(None), slice(None), slice(a0, a1), slice(b0, b1))
    r0, r1, c0, c1 = window if window is not None else (0, h, 0, w)
    r0, r1, c0, c1 = max(r0, a0), min(r1, a1), max(c0, b0), min(c1, b1)
    low_sub, iou = decode_single_mask(mask_decoder, image_embedding[cut], None, sparse, dense[cut],
                                      (r0 - a0, r1 - a0, c0 - b0, c1 - b0), outside, key_pe=sub_pe)
    low = low_sub.new_full((1, 1, 4 * h, 4 * w), outside)
    low[..., 4 * a0:4 * a1, 4 * b0:4 * b1] = low_sub
    return low, iou
