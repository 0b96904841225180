"""
GPT-2, LLaMA and BERT in one file that imports only torch, so it can be copied into another project alone.

    model = build_model(ModelConfig(model_type='llama', n_layer=6, n_head=6, n_embd=384, vocab_size=65))
    logits, loss = model(idx, targets)      # idx, targets: (B, T) int64
    out = model.generate(idx, 100, temperature=0.8, top_k=50)  # (B, T + 100); gpt and llama

The three families share one attention module (fused q/k/v projection, grouped-query heads, optional rotary
embeddings, causal or bidirectional) and one block (pre-LN, or post-LN for BERT). GPT and LLaMA are decoders on
one base class, Decoder (blocks, final norm, LM head, classification, KV cache and generation), and differ only
in embeddings, norm, MLP and head; BERT is an encoder with its own embeddings and MLM head. Attention runs in
F.scaled_dot_product_attention's fused kernels, except on CPU up to 512 tokens, where explicit matmuls are
faster; generation keeps keys and values in a preallocated KV cache and, on CPU, multiplies with weights packed
once for oneDNN (PackedLinear). Layouts follow the Hugging Face checkpoints (GPT-2's c_attn split into q/k/v,
LLaMA's rotate-half RoPE, BERT's post-LN and MLM head) so pretrained weights map onto these modules by renaming.
The GPT-2 speedrun's tricks are switches of ModelConfig (mlp='relu2', qk_norm, logit_softcap, zero_init, untied
heads), off by default, and configure_optimizers(..., muon={...}) gives Muon for the blocks' matrices.
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
    rope_scaling: dict = None    # llama: {'rope_type': 'linear' | 'llama3', 'factor': ...} as in HF configs
    norm_eps: float = 1e-5       # LayerNorm/RMSNorm epsilon (GPT-2 1e-5, LLaMA 1e-5/1e-6, BERT 1e-12)
    tie_embeddings: bool = True  # share token embedding and output head (gpt, llama; always true for bert)
    # the GPT-2 speedrun's switches (modded-nanogpt, nanochat); off by default, so pretrained weights load as before
    mlp: str = ''                # gelu | swiglu | relu2 (relu(x)^2); '' = the family's own (swiglu for llama)
    qk_norm: bool = False        # RMS-normalise each head's q and k before attention: steadier at high learning rates
    logit_softcap: float = 0.0   # logits = cap * tanh(logits / cap): no logit can run away; 0 = off
    zero_init: bool = False      # output projections (and an untied head) start at zero: each block starts as identity
    type_vocab_size: int = 2     # bert: token-type (segment) embeddings
    num_labels: int = 0          # classes of a sequence-classification head (model.classify); 0 = no head

    def __post_init__(self):
        if self.model_type not in ('gpt', 'llama', 'bert'):
            raise ValueError(f"model_type must be gpt, llama or bert, not {self.model_type!r}")
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}")
        self.mlp = self.mlp or ('swiglu' if self.model_type == 'llama' else 'gelu')
        if self.mlp not in ('gelu', 'swiglu', 'relu2'):
            raise ValueError(f"mlp must be gelu, swiglu or relu2, not {self.mlp!r}")
        if self.logit_softcap < 0:
            raise ValueError(f"logit_softcap must be >= 0 (0 = off), not {self.logit_softcap}")
        if self.intermediate_size == 0:
            if self.mlp == 'swiglu':  # 2/3 of 4C keeps SwiGLU's three matrices at the cost of two
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

def rope_cache(block_size, head_dim, theta, device=None, scaling=None):
    """cos, sin tables of shape (block_size, head_dim) in the rotate-half layout that LLaMA checkpoints use. scaling
    (ModelConfig.rope_scaling) stretches the trained context: 'linear' slows every frequency by its factor, 'llama3'
    (Llama 3.1/3.2) only those too slow to turn often within the original context, keeping the fast ones."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    if scaling:
        if scaling['rope_type'] not in ('linear', 'llama3'):
            raise ValueError(f"rope scaling {scaling['rope_type']!r} is not supported (linear, llama3)")
        turns = scaling.get('original_max_position_embeddings', 0) * inv_freq / (2 * math.pi)  # in the old context
        lo, hi = scaling.get('low_freq_factor', 1), scaling.get('high_freq_factor', 4)
        keep = ((turns - lo) / (hi - lo)).clamp(0, 1) if scaling['rope_type'] == 'llama3' else 0.0  # 0..1 blend
        inv_freq = (1 - keep) * inv_freq / scaling['factor'] + keep * inv_freq
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
        self.qk_norm = config.qk_norm
        self.kv_cache = None  # a KVCache while generating (setup_cache); a plain attribute, not a buffer

    def forward(self, x, rope=None, attn_mask=None, pos=None):
        B, T, C = x.size()
        hs = self.head_dim
        q, k, v = self.qkv(x).split([self.n_head * hs, self.n_kv_head * hs, self.n_kv_head * hs], dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)     # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.qk_norm:  # unit RMS per head, no gain: a dot product cannot outgrow sqrt(hs) however weights grow
            q, k = F.rms_norm(q, (hs,)), F.rms_norm(k, (hs,))
        if rope is not None:  # cos, sin already taken at these tokens' positions: (T, hs) or (B, 1, T, hs)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if pos is not None:  # decoding: keys and values of earlier positions come from the cache
            k, v = self.kv_cache.update(pos, k, v)  # (B, nkv, pos + T, hs)
            y = cached_attention(q, k, v, attn_mask)
        else:
            if self.n_kv_head != self.n_head:  # each key/value head serves n_head // n_kv_head query heads
                k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
                v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            y = attention(q, k, v, self.causal, attn_mask, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class KVCache:
    """Keys and values of every position seen so far, preallocated as (B, n_kv_head, max_len, hs) and filled by
    position, so a decode step computes q, k, v for the one new token and nothing grows or is recomputed."""

    def __init__(self, batch_size, n_kv_head, max_len, head_dim, dtype, device):
        self.k = torch.zeros(batch_size, n_kv_head, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, pos, k, v):
        T = k.size(2)
        self.k[:, :, pos:pos + T] = k
        self.v[:, :, pos:pos + T] = v
        return self.k[:, :, :pos + T], self.v[:, :, :pos + T]


def cached_attention(q, k, v, mask):
    """q (B, nh, T, hs) against the cache's k, v (B, nkv, L, hs); mask (B|1, 1, T, L) True where a key is
    visible, or None for all. With grouped-query attention the query heads that share a key/value head are
    laid side by side as extra rows, so k and v are read as they are instead of being copied n_head/nkv times."""
    B, nh, T, hs = q.shape
    g = nh // k.size(1)
    q = q.reshape(B, k.size(1), g * T, hs)  # head h uses kv head h // g, as repeat_interleave has it
    if mask is not None and g > 1:
        mask = mask.repeat(1, 1, g, 1)
    return F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask).to(q.dtype).view(B, nh, T, hs)


def cache_mask(pos, T, pad, device):
    """(B|1, 1, T, pos + T) attention mask for T new tokens at positions pos.. of left-padded rows: a token sees
    the keys up to its own position, except padding (pad: (B,) count per row, or None). A padding token sees
    itself alone, so no row of the softmax is empty (that would put NaN into the cache)."""
    j = torch.arange(pos + T, device=device)              # key positions
    i = pos + torch.arange(T, device=device)[:, None]     # query positions, (T, 1)
    if pad is None:
        return (j <= i)[None, None]
    return ((j <= i) & ((j >= pad[:, None, None]) | (j == i)))[:, None]


class MLP(nn.Module):
    """GPT-2 and BERT: Linear -> GELU -> Linear. GPT-2 uses the tanh approximation of GELU, BERT the exact one.
    mlp='relu2' squares a ReLU instead (Primer, So et al. 2021): sparse, cheap, and it learns faster in short runs."""

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.proj.residual_scale = True
        self.approximate = 'none' if config.model_type == 'bert' else 'tanh'
        self.relu2 = config.mlp == 'relu2'
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.fc(x)
        h = F.relu(h).square() if self.relu2 else F.gelu(h, approximate=self.approximate)
        return self.dropout(self.proj(h))


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


def make_norm(config):
    """LLaMA: RMSNorm. GPT-2 and BERT: LayerNorm, with biases unless config.bias is False."""
    if config.model_type == 'llama':
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.post_ln = config.model_type == 'bert'
        self.ln_1, self.ln_2 = make_norm(config), make_norm(config)
        self.attn = Attention(config, causal=config.model_type != 'bert')
        self.mlp = SwiGLU(config) if config.mlp == 'swiglu' else MLP(config)

    def forward(self, x, rope=None, attn_mask=None, pos=None):
        if self.post_ln:  # BERT normalises after each residual add
            x = self.ln_1(x + self.attn(x, attn_mask=attn_mask))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), rope=rope, attn_mask=attn_mask, pos=pos)
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


_SKIP_INIT = False  # build_model(init=False) is building a model whose weights will be assigned


def init_weights(model, config):
    """GPT-2 initialisation: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * n_layer). zero_init
    starts those projections, and an untied head, at zero (modded-nanogpt): every block begins as the identity and
    the first steps shape the residual stream instead of undoing random noise."""
    if _SKIP_INIT:
        return
    head = getattr(model, 'lm_head', None)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            std = 0.02 / math.sqrt(2 * config.n_layer) if getattr(m, 'residual_scale', False) else 0.02
            if config.zero_init and (getattr(m, 'residual_scale', False) or m is head and not config.tie_embeddings):
                std = 0.0
            nn.init.normal_(m.weight, mean=0.0, std=std) if std else nn.init.zeros_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)


def lm_loss(logits, targets):
    # positions whose target is -100 (padding, unmasked BERT tokens) do not count
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100)


# ----------------------------------------------------------------------------------------------------------
# the three families

class Decoder(nn.Module):
    """What GPT and LLaMA share: token embeddings -> dropout -> causal pre-LN blocks -> ln_f -> lm_head, a
    classification head on the last token, and generation with a KV cache. A family says how positions enter
    (embed: GPT-2 adds learned position embeddings, LLaMA rotates q and k) and whether the head is tied."""

    def __init__(self, config, learned_positions, tie_embeddings):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, C),
            **({'wpe': nn.Embedding(config.block_size, C)} if learned_positions else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.classifier = nn.Linear(C, config.num_labels, bias=False) if config.num_labels else None
        init_weights(self, config)

    def embed(self, idx, p):
        """Token embeddings (B, T, C) of idx at positions p, and the rope (cos, sin) for the blocks, or None."""
        raise NotImplementedError

    def positions(self, idx, pos=None, pad=None, segments=None):
        """Positions of the tokens idx (B, T) and their attention mask. Training: 0..T-1 and a plain causal mask
        (None); or, for rows packed with several examples (segments (B, T): which example each token is), each
        example counts positions from 0 and sees only itself, exactly as if it were alone. Decoding: the tokens sit
        at pos..pos+T-1 of rows left-padded by pad ((B,) counts, or None), their keys and values go to the KV
        caches that setup_cache made, and positions count from each row's first token."""
        T = idx.size(1)
        start = pos or 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size {self.config.block_size}")
        p = torch.arange(start, start + T, device=idx.device)
        if segments is not None:
            first = torch.ones_like(segments, dtype=torch.bool)
            first[:, 1:] = segments[:, 1:] != segments[:, :-1]
            p = p - torch.where(first, p, 0).cummax(dim=1).values  # (B, T): distance from the example's start
            same = segments[:, :, None] == segments[:, None, :]    # (B, T, T)
            return p, (same & torch.ones(T, T, dtype=torch.bool, device=idx.device).tril())[:, None]
        if pad is not None:
            p = (p - pad[:, None]).clamp(min=0)  # (B, T)
        if pos is None or (T == 1 and pad is None):  # one new token sees the whole cache: no mask needed
            return p, None
        return p, cache_mask(pos, T, pad, idx.device)

    def hidden(self, idx, pos=None, pad=None, segments=None):  # the last block's output (B, T, C), before ln_f
        p, mask = self.positions(idx, pos, pad, segments)
        x, rope = self.embed(idx, p)
        return run_blocks(self, self.transformer.h, self.transformer.drop(x), rope=rope, attn_mask=mask, pos=pos)

    def forward(self, idx, targets=None, pos=None, pad=None, segments=None):
        """Logits (B, T, vocab_size), and the loss if targets are given. Decoding passes pos (see positions) and
        needs the next token's logits only: (B, 1, vocab_size). segments: see positions."""
        x = self.hidden(idx, pos, pad, segments)
        if pos is not None:
            x = x[:, -1:]
        logits = self.lm_head(self.transformer.ln_f(x))
        if self.config.logit_softcap:  # in float32: tanh near its asymptotes needs the precision
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits.float() / cap)
        return logits, (lm_loss(logits, targets) if targets is not None else None)

    def classify(self, idx, labels=None, attention_mask=None):
        """Sequence classification, as HF's GPT2/LlamaForSequenceClassification: the head reads each row's last
        real token (rows padded on the right; causal attention never lets real tokens see the padding).
        Logits (B, num_labels), and the cross-entropy loss if labels are given."""
        if self.classifier is None:
            raise ValueError("this model has no classification head: build it with num_labels > 0")
        x = self.hidden(idx)  # (B, T, C)
        B, T, _ = x.shape
        last = attention_mask.long().sum(1) - 1 if attention_mask is not None else \
            torch.full((B,), T - 1, device=x.device)
        logits = self.classifier(self.transformer.ln_f(x[torch.arange(B, device=x.device), last]))  # (B, labels)
        return logits, (F.cross_entropy(logits.float(), labels) if labels is not None else None)

    @torch.inference_mode()  # ~6% faster decoding than no_grad: no version counters, no view tracking
    def generate_stream(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, min_p=None,
                        repetition_penalty=1.0, eos_id=None, stop=None, decode=None, seed=None):
        """Yield the new tokens one step at a time: a list with each row's token, None for rows that have finished.

        prompts: (B, T) tensor or B lists of token ids of any lengths. temperature 0 is greedy. repetition_penalty
        > 1 makes tokens already in a row less likely (logits divided by it when positive, multiplied when
        negative). A row finishes at a token in eos_id (an int or a list), or when its text, decode(tokens), gains
        one of the stop strings (the stop string is part of the output; trim the text). seed makes sampling
        repeatable whatever else uses the global RNG. The prompt and the new tokens share block_size
        positions: a longer prompt is cut from the left, and when the cache is full the last half of it is
        computed afresh and decoding goes on from there (the model then sees block_size // 2 tokens of the past)."""
        if stop and decode is None:
            raise ValueError("stop strings need decode, the tokenizer's ids -> text function")
        device = self.transformer.ln_f.weight.device
        if device.type == 'cpu' and getattr(self, 'cpu_pack', True):
            pack_linears(self)
        seq, pad = left_pad(prompts, device)
        B, V, block = seq.size(0), self.config.vocab_size, self.config.block_size
        if int(seq.max()) >= V or int(seq.min()) < 0:
            raise ValueError(f"prompt token ids must be in [0, {V}) for this model")
        if seq.size(1) >= block:  # keep room for at least one new token
            cut = seq.size(1) - block + 1
            seq, pad = seq[:, cut:], (None if pad is None else (pad - cut).clamp(min=0))
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        eos = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
        seen = None
        if repetition_penalty != 1.0:
            padding = None if pad is None else torch.arange(seq.size(1), device=device) < pad[:, None]  # (B, T)
            real = seq if pad is None else seq.masked_fill(padding, 0)
            seen = torch.zeros(B, V, dtype=torch.bool, device=device).scatter_(1, real, True)
        done, new, text_len = [False] * B, [[] for _ in range(B)], [0] * B
        cache_len = min(block, seq.size(1) + max_new_tokens)
        setup_cache(self, B, cache_len)
        try:
            logits = self(seq, pos=0, pad=pad)[0][:, -1].float()  # prefill: the whole prompt in one pass
            pos = seq.size(1)
            for step in range(max_new_tokens):
                if seen is not None:
                    logits = torch.where(seen, torch.where(logits > 0, logits / repetition_penalty,
                                                           logits * repetition_penalty), logits)
                nxt = sample_logits(logits, temperature, top_k, top_p, min_p, generator)  # (B,)
                out = []
                for b, t in enumerate(nxt.tolist()):
                    if done[b]:
                        out.append(None)
                        continue
                    out.append(t)
                    new[b].append(t)
                    done[b] = t in eos
                    if stop:  # look only at the text this token added, plus room for a stop string it completes
                        text = decode(new[b])
                        tail = text[max(0, text_len[b] - max(map(len, stop))):]
                        done[b] = done[b] or any(s in tail for s in stop)
                        text_len[b] = len(text)
                yield out
                if all(done) or step == max_new_tokens - 1:
                    return
                if seen is not None:
                    seen.scatter_(1, nxt[:, None], True)
                seq = torch.cat((seq, nxt[:, None]), dim=1)
                if pos == cache_len:  # cache full: recompute the last half of the window and go on from there
                    keep = block // 2
                    pad = None if pad is None else (pad - (seq.size(1) - keep)).clamp(min=0)
                    seq = seq[:, -keep:]
                    if pad is not None and not pad.any():
                        pad = None
                    logits, pos = self(seq, pos=0, pad=pad)[0][:, -1].float(), keep
                else:
                    logits = self(nxt[:, None], pos=pos, pad=pad)[0][:, -1].float()  # decode: one token per row
                    pos += 1
        finally:
            setup_cache(self, None, 0)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, **kwargs):
        """Append up to max_new_tokens tokens to each prompt, with the options of generate_stream. A (B, T) tensor
        gives a (B, T + n) tensor as nanoGPT's generate does (rows that finished early are filled with their
        last token, the EOS); B lists give B lists, each ending at its EOS or stop string."""
        rows = prompts.tolist() if torch.is_tensor(prompts) else [list(p) for p in prompts]
        for step in self.generate_stream(prompts, max_new_tokens, **kwargs):
            for row, t in zip(rows, step):
                if t is not None or torch.is_tensor(prompts):
                    row.append(row[-1] if t is None else t)
        return torch.tensor(rows, dtype=prompts.dtype, device=prompts.device) if torch.is_tensor(prompts) else rows


class GPT(Decoder):
    """GPT-2: learned position embeddings, LayerNorm, GELU MLP, the head tied to the token embeddings (or not)."""

    def __init__(self, config):
        assert config.model_type == 'gpt'
        super().__init__(config, learned_positions=True, tie_embeddings=config.tie_embeddings)

    def embed(self, idx, p):
        return self.transformer.wte(idx) + self.transformer.wpe(p), None


class LLaMA(Decoder):
    """LLaMA: rotary position embeddings (RoPE) on q and k, RMSNorm, SwiGLU MLP, the head tied or not."""

    def __init__(self, config):
        assert config.model_type == 'llama'
        super().__init__(config, learned_positions=False, tie_embeddings=config.tie_embeddings)
        cos, sin = rope_cache(config.block_size, config.n_embd // config.n_head, config.rope_theta,
                              scaling=config.rope_scaling)
        # not persistent: derived from the config, so checkpoints stay free of them
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)

    def embed(self, idx, p):
        cos, sin = self.rope_cos[p], self.rope_sin[p]  # (T, hs), or (B, T, hs) for left-padded rows
        rope = (cos, sin) if p.dim() == 1 else (cos[:, None], sin[:, None])  # broadcast over heads
        return self.transformer.wte(idx), rope


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


def build_model(config, init=True):
    """The model family that config.model_type names, freshly initialised; init=False leaves the weights as torch.empty
    made them, for a checkpoint to be assigned at once (assign_weights): a 135M model then builds in milliseconds,
    where random initialisation that the weights replace anyway takes seconds."""
    family = {'gpt': GPT, 'llama': LLaMA, 'bert': BERT}[config.model_type]
    if init:
        return family(config)
    layers = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm)
    saved = [(c, c.reset_parameters) for c in layers]
    global _SKIP_INIT
    try:  # the layers' own reset_parameters, and init_weights, do nothing meanwhile
        _SKIP_INIT = True
        for c in layers:
            c.reset_parameters = lambda self: None
        return family(config)
    finally:
        _SKIP_INIT = False
        for c, reset in saved:
            c.reset_parameters = reset


def assign_weights(model, state):
    """Make the tensors of state (a full state dict in our names) the model's parameters, without copying them; a
    tied head stays tied (assigning gives each name its own Parameter)."""
    model.load_state_dict(state, strict=True, assign=True)
    if model.config.model_type != 'bert' and model.config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return model


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


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type, fused=True, muon=None):
    """AdamW with weight decay on matrices and embeddings only (not on biases and norm gains).
    fused=False for sharded (DTensor) parameters, which the fused kernel does not take. muon: a dict of Muon's
    settings (lr, momentum, weight_decay, ns_dtype) to give the blocks' matrices to Muon instead (see Muon)."""
    if muon is not None:
        return Muon.for_model(model, weight_decay, learning_rate, betas, **muon)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    # the fused kernel is one launch for all parameters; PyTorch has it for CUDA and CPU
    fused = fused and 'fused' in inspect.signature(torch.optim.AdamW).parameters and device_type in ('cuda', 'cpu')
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({'fused': True} if fused else {}))


def newton_schulz(G, steps=5, dtype=torch.bfloat16):
    """About U V^T for G = U S V^T: G with every singular value moved near 1, by a quintic Newton-Schulz iteration
    X <- aX + b(XX^T)X + c(XX^T)^2 X. Keller Jordan's coefficients (a, b, c) make small singular values grow fast
    and leave them anywhere in ~[0.7, 1.2] after 5 steps instead of converging: good enough for a step direction,
    and stable in bf16, so on a GPU the cost is a few bf16 matmuls per matrix."""
    a, b, c = 3.4445, -4.7750, 2.0315
    wide = G.size(0) <= G.size(1)
    X = G.to(dtype) if wide else G.to(dtype).T  # (m, n), m <= n: X X^T is the small Gram matrix
    X = X / (X.norm() + 1e-7)  # spectral norm <= Frobenius norm = 1: inside the iteration's basin
    for _ in range(steps):
        A = X @ X.T                 # (m, m)
        X = a * X + (b * A + c * (A @ A)) @ X
    return (X if wide else X.T).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan, 2024) for the hidden matrices, AdamW for everything else, as one optimizer, so the
    schedule, GradScaler, clipping and checkpoints treat it like AdamW. A Muon step on a matrix W (out, in):
    momentum M <- mu M + (1 - mu) G, a Nesterov look-ahead G + mu (M - G), then that direction orthogonalised
    (newton_schulz) and scaled by sqrt(max(1, out/in)), so every matrix moves by about the same spectral norm
    whatever its gradient's scale. A fused matrix (q/k/v, SwiGLU's gate/up) is orthogonalised piece by piece,
    as the separate matrices it stands for. Groups with muon=True take Muon's lr, momentum and weight decay;
    the others are AdamW's (lr, betas, eps, weight_decay).

    Under torch.distributed (DDP: every process holds the same averaged gradients), process r orthogonalises
    matrices r, r + world, ... and broadcasts the results, so the Newton-Schulz work is shared out and every
    process ends the step with the same weights and state. FSDP shards matrices, which Muon needs whole."""

    def __init__(self, groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, momentum=0.95,
                 ns_steps=5, ns_dtype=torch.bfloat16):
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      ns_steps=ns_steps, muon=False, split=None, lr_ratio=1.0))
        self.ns_dtype = ns_dtype  # not a hyperparameter: left out of the state dict, which stays portable

    @classmethod
    def for_model(cls, model, weight_decay, learning_rate, betas, lr=0.02, momentum=0.95, muon_weight_decay=0.0,
                  ns_dtype=torch.bfloat16):
        """Muon for the 2-D weights inside the blocks; AdamW (learning_rate) for embeddings, head, norms, biases.
        Muon's lr follows the same schedule as learning_rate: each step sets lr * lr_ratio (train.py's loop)."""
        if learning_rate <= 0:
            raise ValueError("Muon's learning rate follows learning_rate's schedule, so learning_rate must be > 0")
        in_blocks = {id(p) for m in model.modules() if isinstance(m, Block) for p in m.parameters()}
        matrices, decay, no_decay = {}, [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p.dim() == 2 and id(p) in in_blocks:
                matrices.setdefault(muon_split(model, name, p), []).append(p)
            else:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{'params': ps, 'muon': True, 'split': list(split) if split else None, 'lr': lr,
                   'lr_ratio': lr / learning_rate, 'momentum': momentum, 'weight_decay': muon_weight_decay}
                  for split, ps in matrices.items()]
        groups += [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
        return cls([g for g in groups if g['params']], lr=learning_rate, betas=betas, ns_dtype=ns_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            (self.muon_step if group['muon'] else self.adamw_step)(group)
        return loss

    def adamw_step(self, group):
        (beta1, beta2), lr, wd, eps = group['betas'], group['lr'], group['weight_decay'], group['eps']
        for p in group['params']:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state.update(step=torch.zeros(()), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state['step'] += 1
            t = state['step'].item()
            p.mul_(1 - lr * wd)
            state['exp_avg'].lerp_(p.grad, 1 - beta1)
            state['exp_avg_sq'].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state['exp_avg_sq'].sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
            p.addcdiv_(state['exp_avg'], denom, value=-lr / (1 - beta1 ** t))

    def muon_step(self, group):
        dist = torch.distributed
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() \
            else (1, 0)
        params = [p for p in group['params'] if p.grad is not None]
        mu, updates, pending = group['momentum'], [], []
        for i, p in enumerate(params):
            buf = self.state[p].setdefault('momentum_buffer', torch.zeros_like(p))
            buf.lerp_(p.grad, 1 - mu)  # every process keeps every buffer: the state a checkpoint saves
            if i % world != rank:
                updates.append(torch.empty_like(p))  # filled by the broadcast from its owner
            else:
                g = p.grad.lerp(buf, mu)  # Nesterov
                pieces = g.split(group['split']) if group['split'] else (g,)
                u = torch.cat([newton_schulz(x, group['ns_steps'], self.ns_dtype) *
                               max(1, x.size(0) / x.size(1)) ** 0.5 for x in pieces])
                updates.append(u)
            if world > 1:
                pending.append(dist.broadcast(updates[-1], src=i % world, async_op=True))
        for work in pending:
            work.wait()
        for p, u in zip(params, updates):
            p.mul_(1 - group['lr'] * group['weight_decay'])
            p.add_(u, alpha=-group['lr'])


def muon_split(model, name, p):
    """How a block's matrix splits into the matrices it fuses: qkv's rows into q, k and v, SwiGLU's gate_up into
    gate and up; () when it is one matrix."""
    cfg = model.config
    hs = cfg.n_embd // cfg.n_head
    if name.endswith('attn.qkv.weight') and p.size(0) == (cfg.n_head + 2 * cfg.n_kv_head) * hs:
        return (cfg.n_head * hs, cfg.n_kv_head * hs, cfg.n_kv_head * hs)
    if name.endswith('mlp.gate_up.weight') and p.size(0) % 2 == 0:
        return (p.size(0) // 2,) * 2
    return ()


# ----------------------------------------------------------------------------------------------------------
# generation with a KV cache

# CPU inference multiplies with weights packed once for oneDNN; bf16 ones stay bf16 where oneDNN has bf16 kernels
# for this CPU (AVX512 BW/VL/DQ, AVX-NE-CONVERT or AMX)
CAN_PACK = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')
ONEDNN_BF16 = CAN_PACK and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear(nn.Linear):
    """nn.Linear whose CPU inference multiplies with a copy of its weight packed into oneDNN's blocked layout, made
    at the first call and again whenever the weight changes. Decoding reads every weight once per token, so it is
    bound by memory bandwidth, and the packed kernels read ~1.5-2x faster than MKL's fp32 matrix-vector product.
    bf16 weights without oneDNN bf16: one row (batch-1 decoding) goes through ATen's bf16 matrix-vector product,
    which reads half the bytes and needs no copy; more rows through an fp32 copy (ATen's bf16 matrix product is
    ~3-7x slower there than packed fp32). From 512 rows on (long prompts), where the work is compute-bound, MKL's
    fp32 matmul on the weight itself (bf16 ones cast per call) beats the packed kernel. Whatever needs gradients,
    and torch.compile, take nn.Linear's path."""

    def forward(self, x):
        w, b = self.weight, self.bias
        if torch.compiler.is_compiling() or x.device.type != 'cpu' or w.dtype not in (torch.float32, torch.bfloat16):
            return F.linear(x, w, b)  # (inductor packs weights itself)
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or b is not None and b.requires_grad):
            self.__dict__.pop('packed', None)  # training: free the copy, the next step makes it stale
            return F.linear(x, w, b)
        rows = x.numel() // x.size(-1)
        if w.dtype == torch.bfloat16 and not ONEDNN_BF16 and rows == 1:
            return F.linear(x, w, b)
        if rows >= 512 and (w.dtype == torch.float32 or not ONEDNN_BF16):  # long prompts: MKL's fp32 matmul
            return F.linear(x.float(), w.float(), b if b is None else b.float()).to(x.dtype)  # is 5-15% faster
        stamp, p = (_stamp(w), b is not None and _stamp(b), _optimizer_steps), self.__dict__.get('packed')
        if p is None or p[0] != stamp:  # (stamp, sample, packed weight, bias, dtype they compute in)
            dtype = w.dtype if ONEDNN_BF16 else torch.float32
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(w.to(dtype), None)
            except RuntimeError:  # oneDNN has no kernel for this CPU: nn.Linear from now on, for every model
                global CAN_PACK
                CAN_PACK, self.__class__ = False, nn.Linear
                return F.linear(x, w, b)
            p = self.__dict__['packed'] = (stamp, _sample(w), packed, None if b is None else b.to(dtype), dtype)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.size(-1)).to(p[4]), p[2], p[3], 'none', [], '')
        return y.view(*x.shape[:-1], y.size(-1)).to(x.dtype)

    def __getstate__(self):  # deepcopy and pickle leave the packed copy behind (oneDNN's tensors have no storage)
        return {k: v for k, v in self.__dict__.items() if k != 'packed'}


def _stamp(t):  # changes when t is written in place (its version counter), replaced (.data =, .to) or recast
    return t.data_ptr(), t.dtype, -1 if t.is_inference() else t._version


def _sample(w):  # 16 or so of the weight's values, spread over it: they tell a changed weight the stamp missed
    return w.reshape(-1)[::max(1, w.numel() // 16)].clone()


_optimizer_steps = 0  # steps of any optimizer: fused AdamW writes the weights without bumping their versions


def _count_step(optimizer, args, kwargs):
    global _optimizer_steps
    _optimizer_steps += 1


from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402 (beside its user)
register_optimizer_step_post_hook(_count_step)


@torch.no_grad()
def pack_linears(model, pack=True):
    """Make every CPU nn.Linear of model a PackedLinear (generate_stream does this itself). The packed copies take
    as much memory as the weights (twice as much for bf16 weights on CPUs without oneDNN bf16, made only when more
    than one row is multiplied: prefill, batches). pack=False turns them back into nn.Linear, frees the copies and
    keeps generate from packing this model again. Copies whose weight changed unseen by its stamp are dropped."""
    model.cpu_pack = pack
    for m in model.modules():
        if pack and CAN_PACK and type(m) is nn.Linear and m.weight.device.type == 'cpu':
            m.__class__ = PackedLinear
        elif type(m) is PackedLinear:
            p = m.__dict__.get('packed')
            if not pack or p is not None and not torch.equal(p[1], _sample(m.weight)):
                m.__dict__.pop('packed', None)
            if not pack:
                m.__class__ = nn.Linear
    return model


def setup_cache(model, batch_size, max_len, dtype=None):
    """Give every attention layer of a gpt/llama model a KV cache for batch_size rows of max_len positions;
    batch_size=None removes them. dtype defaults to float32 on CPU, elsewhere to what the layers compute in."""
    w = model.transformer.ln_f.weight  # not the embedding: quantize.py may have replaced that
    if dtype is None:  # float32 on CPU: its bf16 attention over a long cache is ~5x slower (bench.py decode)
        dev = w.device.type
        dtype = torch.float32 if dev == 'cpu' else torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) \
            else w.dtype
    hs = model.config.n_embd // model.config.n_head
    for block in model.transformer.h:
        block.attn.kv_cache = None if batch_size is None else \
            KVCache(batch_size, model.config.n_kv_head, max_len, hs, dtype, w.device)


def filter_logits(logits, top_k=None, top_p=None, min_p=None):
    """Set to -inf the logits (B, V) of tokens that may not be sampled: outside the top_k, outside the smallest
    set whose probability reaches top_p (nucleus), or less likely than min_p times the most likely token."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None and top_p < 1.0:
        probs, order = F.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        # drop a token when the more likely ones before it already reach top_p (the first always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float('-inf'))
    if min_p:
        probs = F.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float('-inf'))
    return logits


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None, min_p=None, generator=None):
    """Next tokens (B,) from logits (B, V): greedy when temperature is 0, else sampled after the filters."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p, min_p)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


def left_pad(prompts, device):
    """A (B, T) tensor of token ids, or a list of B lists of different lengths, as a left-padded (B, T) tensor
    and the (B,) pad counts (None when all rows are full). Left padding keeps every row's next token in the
    same column, so a batch decodes in lockstep."""
    if torch.is_tensor(prompts):
        seq = prompts.to(device)
        if seq.dim() != 2 or seq.size(1) == 0:
            raise ValueError(f"prompts must be a (B, T) tensor with T >= 1, got shape {tuple(seq.shape)}")
        return seq, None
    rows = [list(r) for r in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    T = max(len(r) for r in rows)
    seq = torch.tensor([[0] * (T - len(r)) + r for r in rows], dtype=torch.long, device=device)
    pad = torch.tensor([T - len(r) for r in rows], device=device)
    return seq, (pad if pad.any() else None)


# module-level spellings of the methods: generate(model, prompts, n)
generate, generate_stream = Decoder.generate, Decoder.generate_stream
