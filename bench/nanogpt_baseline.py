"""A nanoGPT-equivalent baseline: karpathy/nanoGPT's model.py + train.py, reduced to the CPU "baby
GPT" command of its README, rewritten here (no code copied) so the benchmark can run it beside
gptstack on the same machine:

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

Faithful to what costs time: GPT-2 block (LayerNorm without bias, fused c_attn, SDPA causal,
4x GELU MLP), learned positions, tied head, AdamW on >=2-D params (wd 0.1, betas 0.9/0.99),
warmup 100 + cosine to 1e-4, grad clip 1.0, a fresh np.memmap per batch, eval of 20 batches per
split every 250 iters (iters 0..2000 inclusive: 2001 steps), a checkpoint when val improves, a
log line with loss.item() every iter. fp32 (nanoGPT's CPU path uses no autocast).

Usage: python bench/nanogpt_baseline.py --data input.txt --out DIR [--max-iters 2000]
Prints TRAIN_END (wall-clock time at the end of training) and PREP_SECONDS (data preparation,
nanoGPT's separate prepare.py), so the caller times the train.py command alone, from process
start; then VAL_LOSS on the full val split (untimed).
"""
import time

T0 = time.time()

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class LayerNorm(nn.Module):
    def __init__(self, ndim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class SelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.n_head = n_head

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(n_embd), SelfAttention(n_embd, n_head)
        self.ln_2 = LayerNorm(n_embd)
        self.c_fc, self.c_proj = nn.Linear(n_embd, 4 * n_embd, bias=False), nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx, targets):
        pos = torch.arange(idx.size(1), dtype=torch.long)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-iters", type=int, default=2000)
    args = ap.parse_args()
    block_size, batch_size, lr, min_lr, warmup, decay_iters = 64, 12, 1e-3, 1e-4, 100, args.max_iters
    eval_interval, eval_iters = 250, 20

    # nanoGPT's prepare.py (run before train.py, so outside the timed command)
    os.makedirs(args.out, exist_ok=True)
    text = open(args.data, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = len(text)
    for name, part in (("train", text[: int(n * 0.9)]), ("val", text[int(n * 0.9):])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(os.path.join(args.out, f"{name}.bin"))
    t_train = time.time()

    def get_batch(split):
        data = np.memmap(os.path.join(args.out, f"{split}.bin"), dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy(data[i : i + block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block_size].astype(np.int64)) for i in ix])
        return x, y

    torch.manual_seed(1337)
    model = GPT(len(chars), block_size, 4, 4, 128)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.99))

    def get_lr(it):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it > decay_iters:
            return min_lr
        ratio = (it - warmup) / (decay_iters - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ("train", "val"):
            losses = torch.zeros(eval_iters)
            for k in range(eval_iters):
                losses[k] = model(*get_batch(split))[1].item()
            out[split] = losses.mean()
        model.train()
        return out

    X, Y = get_batch("train")
    it, best_val, t0 = 0, 1e9, time.time()
    while True:
        for g in optimizer.param_groups:
            g["lr"] = get_lr(it)
        if it % eval_interval == 0:
            losses = estimate_loss()
            print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
            if losses["val"] < best_val:
                best_val = losses["val"]
                if it > 0:
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": it},
                               os.path.join(args.out, "ckpt.pt"))
        _, loss = model(X, Y)
        X, Y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t1 = time.time()
        dt, t0 = t1 - t0, t1
        print(f"iter {it}: loss {loss.item():.4f}, time {dt * 1000:.2f}ms", flush=True)
        it += 1
        if it > args.max_iters:
            break
    print(f"TRAIN_END {time.time():.6f}", flush=True)
    print(f"PREP_SECONDS {t_train - T0:.6f}", flush=True)

    # untimed: the loss on the full val split, in non-overlapping windows (as gptstack reports)
    val = torch.from_numpy(np.fromfile(os.path.join(args.out, "val.bin"), dtype=np.uint16).astype(np.int64))
    nw = (len(val) - 1) // block_size
    xs, ys = val[: nw * block_size].view(nw, block_size), val[1 : nw * block_size + 1].view(nw, block_size)
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, nw, 256):
            total += model(xs[i : i + 256], ys[i : i + 256])[1].item() * xs[i : i + 256].numel()
    print(f"VAL_LOSS {total / (nw * block_size):.4f}", flush=True)


if __name__ == "__main__":
    main()
