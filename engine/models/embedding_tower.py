"""The image tower as the fast paths run it: the same embedding, without work the embedding never reads.

A ViT that pools by its class token reads one token out of the last block. Every
token's query, attention output, projection and MLP in that block are computed and
then thrown away: only the class token's are needed, plus every token's keys and
values (the class token attends to them). `embedding_only(visual)` returns a tower
whose last block does exactly that. The arithmetic is the same, so the embedding
is the same to float rounding (max abs difference ~6e-7 on a BiomedCLIP-shaped
ViT-B/16), and the tower does 6.9% fewer multiply-adds (ViT-B/16 at 224 px: 16.7 ->
15.6 GMAC per image; ViT-L/14 at 336 px: 3.5% fewer, one block of 24).

Why here and not in the model: heatmaps need every patch token and the gradients
of the fp32 tower (engine.heatmap), so clip.model stays as open_clip built it. The
fast paths (engine.models.fastpath) only produce pooled embeddings, and the probe
still checks each one against the unmodified fp32 tower.

Recognised (anything else: None, and the fast paths use the tower as it is):
- open_clip's TimmModel around timm's VisionTransformer with global_pool 'token'
  and standard `Block`/`Attention` (BiomedCLIP);
- open_clip's own VisionTransformer with pool_type 'tok', no attention pooling,
  batch-first `ResidualAttentionBlock`s (UniMed-CLIP, OpenAI-style CLIP).
"""

from __future__ import annotations

import torch


def embedding_only(visual: torch.nn.Module) -> torch.nn.Module | None:
    """A tower computing visual's pooled embedding with a class-token-only last block, or None when
    visual is not a ViT of a shape recognised here. Shares visual's weights (eval mode, no copies
    beyond the last block's split query/key-value projection)."""
    if _is_timm_token_vit(visual):
        return _TimmClassTokenTower(visual).eval()
    if _is_open_clip_token_vit(visual):
        return _OpenClipClassTokenTower(visual).eval()
    return None


# --------------------------------------------------------------------------- timm (BiomedCLIP)
def _is_timm_token_vit(visual: torch.nn.Module) -> bool:
    try:
        from timm.models.vision_transformer import Attention, Block, VisionTransformer
    except ImportError:
        return False
    trunk = getattr(visual, "trunk", None)
    if type(visual).__name__ != "TimmModel" or type(trunk) is not VisionTransformer:
        return False
    if trunk.global_pool != "token" or getattr(trunk, "attn_pool", None) is not None or len(trunk.blocks) < 1:
        return False
    last = trunk.blocks[-1]
    attn = getattr(last, "attn", None)
    # exact classes only: a subclass (or a gated attention) may compute something this file does not; and every
    # attribute the forward below reads (timm versions add and rename them)
    return (
        type(last) is Block
        and type(attn) is Attention
        and getattr(attn, "gate", None) is None
        and all(hasattr(trunk, a) for a in ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "norm", "forward_head"))
        and all(hasattr(last, a) for a in ("norm1", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"))
        and all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm", "norm", "proj"))
    )


class _TimmClassTokenTower(torch.nn.Module):
    def __init__(self, visual: torch.nn.Module):
        super().__init__()
        self.visual = visual
        trunk = visual.trunk
        attn = trunk.blocks[-1].attn
        width = attn.num_heads * attn.head_dim
        qkv = attn.qkv
        # Separate Linear modules (not slices in forward) so that every path quantises them as it does the rest.
        self.query = torch.nn.Linear(qkv.in_features, width, bias=qkv.bias is not None)
        self.key_value = torch.nn.Linear(qkv.in_features, 2 * width, bias=qkv.bias is not None)
        with torch.no_grad():
            self.query.weight.copy_(qkv.weight[:width])
            self.key_value.weight.copy_(qkv.weight[width:])
            if qkv.bias is not None:
                self.query.bias.copy_(qkv.bias[:width])
                self.key_value.bias.copy_(qkv.bias[width:])
        for p in (*self.query.parameters(), *self.key_value.parameters()):
            p.requires_grad_(False)
        self.heads, self.head_dim = attn.num_heads, attn.head_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        trunk = self.visual.trunk
        x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(pixels))))
        for block in trunk.blocks[:-1]:
            x = block(x)
        block = trunk.blocks[-1]
        attn = block.attn
        batch, tokens, _ = x.shape
        h = block.norm1(x)
        q = self.query(h[:, :1]).reshape(batch, 1, self.heads, self.head_dim).transpose(1, 2)
        kv = self.key_value(h).reshape(batch, tokens, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = attn.q_norm(q), attn.k_norm(kv[0]), kv[1]
        # written out rather than F.scaled_dot_product_attention: the ONNX route then gives OpenVINO/ORT plain
        # MatMul/Softmax, as for the other blocks (an SDPA node measured slower under int8 on the AMD EPYC)
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, 1, self.heads * self.head_dim)
        token = x[:, :1] + block.drop_path1(block.ls1(attn.proj(attn.norm(out))))
        token = token + block.drop_path2(block.ls2(block.mlp(block.norm2(token))))
        features = trunk.forward_head(trunk.norm(token))  # 'token' pooling picks index 0 of one token
        return self.visual.head(features)


# --------------------------------------------------------------------------- open_clip's own ViT (UniMed-CLIP)
def _is_open_clip_token_vit(visual: torch.nn.Module) -> bool:
    try:
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
    except ImportError:
        return False
    if type(visual) is not VisionTransformer:
        return False
    transformer = visual.transformer
    blocks = getattr(transformer, "resblocks", None)
    return (
        hasattr(visual, "_embeds")
        and hasattr(visual, "ln_post")
        and getattr(visual, "pool_type", None) == "tok"
        and getattr(visual, "attn_pool", None) is None
        and not getattr(visual, "output_tokens", False)
        and getattr(transformer, "batch_first", False)
        and blocks is not None
        and len(blocks) >= 1
        and type(blocks[-1]) is ResidualAttentionBlock
        and not hasattr(blocks[-1], "ln_1_kv")
        and type(blocks[-1].attn) is torch.nn.MultiheadAttention
        and blocks[-1].attn.batch_first
    )


class _OpenClipClassTokenTower(torch.nn.Module):
    def __init__(self, visual: torch.nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        x = visual._embeds(pixels)
        blocks = visual.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        block = blocks[-1]
        h = block.ln_1(x)
        # nn.MultiheadAttention projects the query from its own input: one token's query, every token's keys/values
        attended = block.attn(h[:, :1], h, h, need_weights=False)[0]
        token = x[:, :1] + block.ls_1(attended)
        token = token + block.ls_2(block.mlp(block.ln_2(token)))
        pooled = visual.ln_post(token[:, 0])  # LayerNorm is per token: before or after the pool is the same
        return pooled @ visual.proj if visual.proj is not None else pooled
