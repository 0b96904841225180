"""
GPT-2, LLaMA and BERT in one file that imports only torch, so it can be copied into another project alone.

    model = build_model(ModelConfig(model_type='llama', n_layer=6, n_head=6, n_embd=384, vocab_size=65))
    logits, loss = model(idx, targets)      # idx, targets: (B, T) int64

The three families share one attention module (fused q/k/v projection, grouped-query heads, optional rotary
embeddings, causal or bidirectional) and one block (pre-LN, or post-LN for BERT); they differ in embeddings,
norm, MLP and head. Attention goes through F.scaled_dot_product_attention, which picks a flash kernel on CPU
and CUDA. Layouts follow the Hugging Face checkpoints (GPT-2's c_attn split into q/k/v, LLaMA's rotate-half
RoPE, BERT's post-LN and MLM head) so pretrained weights map onto these modules by renaming alone.
"""
import inspect
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F


@dataclass
class ModelConfig:
    model_type: str = 'gpt'      # gpt | llama | bert
    vocab_size: int = 50304      # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    block_size: int = 1024       # longest sequence (learned positions for gpt/bert, RoPE table for llama)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0           # llama: key/value heads for grouped-query attention; 0 = n_head
    n_embd: int = 768
    intermediate_size: int = 0   # MLP hidden width; 0 = 4*n_embd (gpt, bert) or ~8/3*n_embd (llama SwiGLU)
    dropout: float = 0.0
    bias: bool = True            # biases in linears and LayerNorms (gpt, bert); llama has none
    qkv_bias: bool = False       # llama only: Qwen2-style biases on q/k/v
    rope_theta: float = 10000.0  # llama: RoPE base
    norm_eps: float = 1e-5       # LayerNorm/RMSNorm epsilon (GPT-2 1e-5, LLaMA 1e-5/1e-6, BERT 1e-12)
    tie_embeddings: bool = True  # share token embedding and output head (always true for gpt and bert)
    type_vocab_size: int = 2     # bert: token-type (segment) embeddings
    num_labels: int = 0          # bert: classes of the sequence-classification head; 0 = no head

    def __post_init__(self):
        if self.model_type not in ('gpt', 'llama', 'bert'):
            raise ValueError(f"model_type must be gpt, llama or bert, not {self.model_type!r}")
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}")
        if self.intermediate_size == 0:
            if self.model_type == 'llama':  # 2/3 of 4C keeps SwiGLU's three matrices at the cost of two
                self.intermediate_size = 64 * math.ceil(8 * self.n_embd / 3 / 64)
            else:
                self.intermediate_size = 4 * self.n_embd

    @classmethod
    def from_dict(cls, d):
        """Build from a dict that may hold other keys (a training config, an old checkpoint)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------------------------------------
# building blocks shared by the three families

def rope_cache(block_size, head_dim, theta, device=None):
    """cos, sin tables of shape (block_size, head_dim) in the rotate-half layout that LLaMA checkpoints use."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    freqs = torch.outer(torch.arange(block_size, device=device).float(), inv_freq)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)                                             # (T, hs)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    # x: (B, nh, T, hs); cos, sin: (T, hs). Rotates the pairs (x[i], x[i + hs/2]).
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def attention(q, k, v, causal, mask=None, dropout_p=0.0):
    """softmax(q k^T / sqrt(hs)) v over (B, nh, T, hs) tensors; mask (B, 1, 1, T) is True where keys count.
    On CPU at short contexts explicit matmuls beat the fused kernel: its backward is slow on CPU, and in
    bf16 the whole step runs ~1.2x faster this way (bench.py train). Elsewhere the fused (flash) kernel wins
    and needs O(T) memory instead of O(T^2)."""
    T = q.size(-2)
    if q.device.type != 'cpu' or T > 512:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                              dropout_p=dropout_p)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, T, T)
    if causal:
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float('-inf'))
    if mask is not None:
        att = att.masked_fill(~mask, float('-inf'))
    att = F.dropout(F.softmax(att, dim=-1), p=dropout_p)  # softmax stays bf16 under CPU autocast: faster
    return att @ v


class Attention(nn.Module):

    def __init__(self, config, causal):
        super().__init__()
        C, self.n_head, self.n_kv_head = config.n_embd, config.n_head, config.n_kv_head
        self.head_dim = C // config.n_head
        self.causal = causal
        qkv_bias = config.qkv_bias if config.model_type == 'llama' else config.bias
        # q, k and v in one matmul; with grouped-query attention k and v have fewer heads
        self.qkv = nn.Linear(C, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(C, C, bias=config.bias and config.model_type != 'llama')
        self.proj.residual_scale = True  # GPT-2 init: scaled by 1/sqrt(2 * n_layer)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, attn_mask=None):
        B, T, C = x.size()
        hs = self.head_dim
        q, k, v = self.qkv(x).split([self.n_head * hs, self.n_kv_head * hs, self.n_kv_head * hs], dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)     # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])
        if self.n_kv_head != self.n_head:  # each key/value head serves n_head // n_kv_head query heads
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = attention(q, k, v, self.causal, attn_mask, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """GPT-2 and BERT: Linear -> GELU -> Linear. GPT-2 uses the tanh approximation of GELU, BERT the exact one."""

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.proj.residual_scale = True
        self.approximate = 'tanh' if config.model_type == 'gpt' else 'none'
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class SwiGLU(nn.Module):
    """LLaMA: down(silu(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, config):
        super().__init__()
        self.hidden = config.intermediate_size
        self.gate_up = nn.Linear(config.n_embd, 2 * self.hidden, bias=False)
        self.proj = nn.Linear(self.hidden, config.n_embd, bias=False)
        self.proj.residual_scale = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        return self.dropout(self.proj(F.silu(gate) * up))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        llama, self.post_ln = config.model_type == 'llama', config.model_type == 'bert'
        norm = (lambda: nn.RMSNorm(config.n_embd, eps=config.norm_eps)) if llama else \
               (lambda: nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias))
        self.ln_1, self.ln_2 = norm(), norm()
        self.attn = Attention(config, causal=config.model_type != 'bert')
        self.mlp = SwiGLU(config) if llama else MLP(config)

    def forward(self, x, rope=None, attn_mask=None):
        if self.post_ln:  # BERT normalises after each residual add
            x = self.ln_1(x + self.attn(x, attn_mask=attn_mask))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), rope=rope)
        return x + self.mlp(self.ln_2(x))


def run_blocks(model, blocks, x, **kwargs):
    """x through each block. With model.grad_checkpoint = True a block's activations are not kept for the
    backward pass but recomputed there: far less memory for about a third more compute."""
    for block in blocks:
        if getattr(model, 'grad_checkpoint', False) and model.training:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, **kwargs)
        else:
            x = block(x, **kwargs)
    return x


def init_weights(model, config):
    """GPT-2 initialisation: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * n_layer)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            std = 0.02 / math.sqrt(2 * config.n_layer) if getattr(m, 'residual_scale', False) else 0.02
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)


def lm_loss(logits, targets):
    # positions whose target is -100 (padding, unmasked BERT tokens) do not count
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100)


# ----------------------------------------------------------------------------------------------------------
# the three families

class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.model_type == 'gpt'
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        init_weights(self, config)

    def forward(self, idx, targets=None):
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        x = run_blocks(self, self.transformer.h, x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        return logits, (lm_loss(logits, targets) if targets is not None else None)


class LLaMA(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.model_type == 'llama'
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.RMSNorm(config.n_embd, eps=config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        cos, sin = rope_cache(config.block_size, config.n_embd // config.n_head, config.rope_theta)
        # not persistent: derived from the config, so checkpoints stay free of them
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        init_weights(self, config)

    def forward(self, idx, targets=None):
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        x = self.transformer.drop(self.transformer.wte(idx))  # (B, T, C)
        x = run_blocks(self, self.transformer.h, x, rope=(self.rope_cos, self.rope_sin))
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        return logits, (lm_loss(logits, targets) if targets is not None else None)


class BERT(nn.Module):
    """Bidirectional encoder with BERT's MLM head (tied to the token embeddings), pooler and classifier."""

    def __init__(self, config):
        super().__init__()
        assert config.model_type == 'bert'
        self.config = config
        C = config.n_embd
        self.embeddings = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, C),
            wpe=nn.Embedding(config.block_size, C),
            wtt=nn.Embedding(config.type_vocab_size, C),
            ln=nn.LayerNorm(C, eps=config.norm_eps),
            drop=nn.Dropout(config.dropout),
        ))
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        # MLM head: transform, then decode with the embedding matrix plus a per-token bias
        self.mlm_dense = nn.Linear(C, C)
        self.mlm_ln = nn.LayerNorm(C, eps=config.norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.pooler = nn.Linear(C, C)
        self.classifier = nn.Linear(C, config.num_labels) if config.num_labels else None
        self.drop = nn.Dropout(config.dropout)
        init_weights(self, config)

    def encode(self, idx, token_type_ids=None, attention_mask=None):
        """Hidden states (B, T, C). attention_mask: (B, T), 1 for real tokens and 0 for padding."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(idx)
        e = self.embeddings
        x = e.drop(e.ln(e.wte(idx) + e.wpe(pos) + e.wtt(token_type_ids)))
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        return run_blocks(self, self.h, x, attn_mask=mask)

    def forward(self, idx, targets=None, token_type_ids=None, attention_mask=None):
        """Masked-LM logits (B, T, vocab_size); targets are -100 except at the masked positions."""
        x = self.encode(idx, token_type_ids, attention_mask)
        x = self.mlm_ln(F.gelu(self.mlm_dense(x)))
        logits = F.linear(x, self.embeddings.wte.weight, self.mlm_bias)
        return logits, (lm_loss(logits, targets) if targets is not None else None)

    def classify(self, idx, labels=None, token_type_ids=None, attention_mask=None):
        """Sequence classification from the pooled first ([CLS]) token: logits (B, num_labels)."""
        if self.classifier is None:
            raise ValueError("this BERT has no classification head: build it with num_labels > 0")
        pooled = torch.tanh(self.pooler(self.encode(idx, token_type_ids, attention_mask)[:, 0]))
        logits = self.classifier(self.drop(pooled))
        return logits, (F.cross_entropy(logits.float(), labels) if labels is not None else None)


def build_model(config):
    """The model family that config.model_type names, freshly initialised."""
    return {'gpt': GPT, 'llama': LLaMA, 'bert': BERT}[config.model_type](config)


# ----------------------------------------------------------------------------------------------------------
# things every training script wants to know about a model

def num_params(model, non_embedding=True):
    """Parameters counted once (tied weights once); non_embedding leaves out position embeddings, as GPT-2 does."""
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        for name, p in model.named_parameters():
            if name.endswith('wpe.weight'):
                n -= p.numel()
    return n


def flops_per_token(model, seq_len):
    """Training FLOPs per token (forward + backward): 6 per matmul weight, plus attention (PaLM appendix B)."""
    cfg = model.config
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    if cfg.model_type == 'bert':
        matmul += cfg.vocab_size * cfg.n_embd  # the MLM decoder reuses the embedding matrix
    return 6 * matmul + 12 * cfg.n_layer * cfg.n_embd * seq_len


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type, fused=True):
    """AdamW with weight decay on matrices and embeddings only (not on biases and norm gains).
    fused=False for sharded (DTensor) parameters, which the fused kernel does not take."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    # the fused kernel is one launch for all parameters; PyTorch has it for CUDA and CPU
    fused = fused and 'fused' in inspect.signature(torch.optim.AdamW).parameters and device_type in ('cuda', 'cpu')
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({'fused': True} if fused else {}))


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None):
    """Append max_new_tokens sampled tokens to idx (B, T) and return (B, T + max_new_tokens).
    temperature=0 is greedy. The context is cropped to the last block_size tokens."""
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -model.config.block_size:]
        logits, _ = model(idx_cond)
        logits = logits[:, -1, :].float()  # (B, vocab_size)
        if temperature == 0:
            idx_next = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('inf')
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


GPT.generate = LLaMA.generate = generate
