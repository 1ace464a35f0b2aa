"""Stage 1 (indexer warm-up) on long real contexts, with the frozen model's activations cached.

In stage 1 only the indexer trains, and what it learns from (each layer's attention input x, the
query latent qr, and the dense attention p_t of the frozen model) does not change while it does.
So the costly part, a dense forward over 8k-32k tokens, is done once per example (`collect`) and
the indexer is then fitted for many steps on the cached tensors (`fit`), at a few hundred
milliseconds per 32k-token example instead of the ~30 s of a `dsa_rag.model.training.train --stage 1` step.

The loss is the stage-1 loss of the V3.2 report, KL(p_t || softmax(I_t)) over all causal keys,
per layer, on a subset of query rows: every question and answer row (the ones whose selection
decides the answer, weighted --qa-weight) and a sample of document rows. p_t is kept as its
--keep largest entries, renormalized (the indexer has to rank the head of p_t into its top-k,
not fit the flat tail; --keep 0 keeps all of it).

    .venv/bin/python -m dsa_rag.model.training.indexer_fit collect --model dsa-tiny --out tmp/ifit/long --n 40 --len 8192:32768
    .venv/bin/python -m dsa_rag.model.training.indexer_fit collect --model dsa-tiny --out tmp/ifit/short --n 200 --len 1024:4096
    .venv/bin/python -m dsa_rag.model.training.indexer_fit fit --model dsa-tiny --data tmp/ifit/long,tmp/ifit/short \\
        --steps 3000 --out tmp/ifit/run --export tmp/ifit/weights
    .venv/bin/python -m pytest -q tests/model/training/test_indexer_fit.py
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

import torch

from dsa_rag.model.config import INDEX_SCORES
from dsa_rag.model.load import load_any
from dsa_rag.model.tokenizer import ByteTokenizer
from dsa_rag.model.training import data
from dsa_rag.model.training.attention import attention_target, mla_qkv, query_scores, sdpa
from dsa_rag.model.training.train import export, index_rows, lr_at, parse_len, question_start


# ---------------------------------------------------------------- collect
@torch.no_grad()
def capture(model, ids: torch.Tensor, rows: torch.Tensor, keep: int) -> dict:
    """One example through the frozen model with dense attention. ids [1, T]; rows [R] query rows.
    -> {"x": [L, T, dim] bf16 attention inputs, "qr": [L, R, q_lora] bf16, "p_idx": [L, R, K] int32,
    "p": [L, R, K] fp32}: p_t of each row as its K largest entries (renormalized), or all of it."""
    T = ids.shape[1]
    pos = torch.arange(T, device=ids.device)[None]
    h = model.embed(ids)
    cos, sin = model.rotary(pos, h.dtype)
    allowed = torch.arange(T, device=ids.device)[None] <= rows[:, None]  # [R, T]
    xs, qrs, pis, ps = [], [], [], []
    for blk in model.layers:
        attn = blk.attn
        x = blk.attn_norm(h)
        qr, q, k, v = mla_qkv(attn, x, cos, sin)
        o = sdpa(q, k, v, None, attn.scale)
        h = h + attn.wo(o.transpose(1, 2).reshape(1, T, -1))
        h = h + blk.ffn(blk.ffn_norm(h))
        p = attention_target(q[:, :, rows], k, allowed, attn.scale)[0]  # [R, T]
        if keep and keep < T:
            p, pi = p.topk(keep, -1)
            p = p / p.sum(-1, keepdim=True)
        else:
            pi = torch.arange(T, device=ids.device).expand(len(rows), T)
        xs.append(x[0].bfloat16())
        qrs.append(qr[0, rows].bfloat16())
        pis.append(pi.int())
        ps.append(p.float())
    return {"x": torch.stack(xs).cpu(), "qr": torch.stack(qrs).cpu(), "p_idx": torch.stack(pis).cpu(),
            "p": torch.stack(ps).cpu()}


def collect(args) -> None:
    model = load_any(args.model)  # capture() runs the dense training attention itself
    tok = ByteTokenizer()
    q_id = tok.special("<question>")
    tasks = args.tasks.split(",")
    tw = [float(v) for v in args.task_weights.split(",")][: len(tasks)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lo, hi = parse_len(args.len)
    rng = random.Random(args.seed)
    t0 = time.time()
    for i in range(args.n):
        n = rng.randint(lo, hi)
        x, _, _ = data.batch(rng, n, 1, tasks, tw, tok)
        rows = index_rows(rng, x, q_id, args.rows) if x.shape[1] > args.rows else torch.arange(x.shape[1])
        rec = capture(model, x, rows, args.keep)
        rec.update(rows=rows, q0=question_start(x[0], q_id), T=x.shape[1])
        path = out / f"{args.seed:03d}_{i:04d}.pt"
        torch.save(rec, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
        print(f"[{i + 1}/{args.n}] {x.shape[1]} tokens, {len(rows)} rows, {time.time() - t0:.0f}s", flush=True)


# ---------------------------------------------------------------- fit
def fit_target(p, pi, keep: int = 0, flat: float = 0.0):
    """The KL target from a cached p_t (values p, key indices pi [R, K]): cut to its `keep` largest
    entries and renormalized (0: as cached), then mixed with the uniform distribution over those
    entries, weight `flat`. The uniform part weighs every key of p_t's top-k the same, as the
    recall of that set does; p_t's own weights leave the keys near the cut, the ones that decide
    the recall, with little pull."""
    if keep and keep < p.shape[-1]:
        p, j = p.topk(keep, -1)
        pi = pi.gather(-1, j)
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-20)
    if flat:
        live = (p > 0).float()  # an early row has fewer causal keys than entries
        p = (1 - flat) * p + flat * live / live.sum(-1, keepdim=True).clamp_min(1.0)
    return p, pi


def indexer_loss(idx_mod, rec: dict, layer: int, cos, sin, qa_weight: float, topk: int, want_recall=False,
                 keep: int = 0, flat: float = 0.0):
    """Weighted mean over the rows of KL(target || softmax(I_t)) for one layer's indexer on a cached
    example, the target being p_t as `fit_target` shapes it (p_t itself by default); with
    want_recall also (recall of p_t's top-k by I's top-k, the p mass I's top-k covers) over rows
    with more than topk causal keys."""
    x = rec["x"][layer].float()[None]
    rows = rec["rows"]
    k, _ = idx_mod.keys(x, cos, sin)  # [1, T, D]
    I = query_scores(idx_mod, k, x[:, rows], rec["qr"][layer].float()[None], cos[:, rows], sin[:, rows], rows)[0]  # [R, T]
    T = x.shape[1]
    causal = torch.arange(T)[None] <= rows[:, None]
    logq = I.masked_fill(~causal, float("-inf")).log_softmax(-1)
    p, pi = rec["p"][layer], rec["p_idx"][layer].long()
    tp, tpi = fit_target(p, pi, keep, flat)
    # p_idx of an early row may list keys past its position (p = 0 there, logq = -inf): skip them
    kl = torch.where(tp > 0, tp * (tp.clamp_min(1e-20).log() - logq.gather(-1, tpi)), 0.0).sum(-1)  # [R]
    rw = torch.where(rows >= rec["q0"], qa_weight, 1.0)
    out = {"kl": (kl * rw).sum() / rw.sum()}
    if want_recall:
        with torch.no_grad():
            long = rows + 1 > topk
            if long.any():
                sel = I[long].masked_fill(~causal[long], float("-inf")).topk(topk, -1)[1]
                hit = torch.zeros(int(long.sum()), T, dtype=torch.bool).scatter_(-1, sel, True)
                pt = pi[long].gather(-1, p[long].topk(topk, -1)[1])  # p's top-k keys
                rec_rows = hit.gather(-1, pt).float().mean(-1)  # [rows with > topk keys]
                out["recall"] = float(rec_rows.mean())
                qa = rows[long] >= rec["q0"]  # the question and answer rows: what decides the answer
                out["qa_recall"] = float(rec_rows[qa].mean()) if qa.any() else float("nan")
                full = torch.zeros(int(long.sum()), T).scatter_(-1, pi[long], p[long])
                out["mass"] = float(full.gather(-1, sel).sum(-1).mean())
    return out


def load_dir(path: str) -> list[dict]:
    # mmap: the cache is ~10 GB; mapped pages are shared by fits running side by side
    return [torch.load(f, weights_only=False, mmap=True) for f in sorted(Path(path).glob("*.pt"))]


@torch.no_grad()
def grow_index_heads(model, n_heads: int, seed: int = 0, split_noise: float = 0.05) -> None:
    """Give every indexer n_heads heads, with the scores' ranking unchanged until the fit moves them.

    "relu": the old heads are kept and the new ones are silent (their rows of weights_proj are 0);
    the old rows of weights_proj are scaled by sqrt(n_heads / old) to undo the n_heads^-1/2 in queries().
    Mixtures: a head with log-weight 0 is not silent (weights_proj has no bias), so instead every
    head is copied n_heads / old times. Each copy adds the same exp(b_h) * term, so I_t moves by
    log(n_heads / old) for every key: the same top-k and the same softmax(I_t). The copies' query
    rows and weight rows get Gaussian noise of split_noise times their tensor's std, or the fit
    would move them identically forever."""
    cfg = model.cfg
    old = cfg.index_n_heads
    if n_heads < old:
        raise ValueError(f"--index-heads {n_heads} < the model's {old}: heads can only be added")
    if n_heads == old:
        return
    mixture = cfg.index_score != "relu"
    if mixture and n_heads % old:
        raise ValueError(f"--index-heads {n_heads}: a mixture indexer grows by copying its {old} heads, "
                         f"so it needs a multiple of {old}")
    g = torch.Generator().manual_seed(seed)
    cfg.index_n_heads = n_heads
    for blk in model.layers:
        ix = blk.attn.indexer
        d = ix.head_dim
        wq = ix.wq_b.weight  # [old * d, q_lora]
        wp = ix.weights_proj.weight  # [old, dim] fp32
        if mixture:
            reps = n_heads // old - 1
            new_q = wq.repeat(reps, 1)
            new_q = new_q + torch.randn(new_q.shape, generator=g).to(wq.dtype) * wq.std() * split_noise
            new_w = wp.repeat(reps, 1)
            new_w = new_w + torch.randn(new_w.shape, generator=g) * wp.std() * split_noise
            wp_old = wp
        else:
            new_q = (torch.randn((n_heads - old) * d, wq.shape[1], generator=g) * wq.std()).to(wq.dtype)
            new_w = wp.new_zeros(n_heads - old, wp.shape[1])
            wp_old = wp * (n_heads / old) ** 0.5
        ix.wq_b = torch.nn.Linear(wq.shape[1], n_heads * d, bias=False)
        ix.wq_b.weight.copy_(torch.cat([wq, new_q]))
        ix.weights_proj = torch.nn.Linear(wp.shape[1], n_heads, bias=False, dtype=torch.float32)
        ix.weights_proj.weight.copy_(torch.cat([wp_old, new_w]))
        ix.n_heads = n_heads


@torch.no_grad()
def grow_index_dim(model, head_dim: int) -> None:
    """Double the indexer's head dim, scores unchanged until fitted. The key gains head_dim / 2
    dims that mirror the old ones about their mean (2 * mean - k): LayerNorm over all of them then
    sees the old dims' mean and variance, so the old dims come out as before; the queries' new dims
    are 0 (they move as soon as the fit does). The new dims are RoPE-free (appended after the old)."""
    cfg = model.cfg
    old = cfg.index_head_dim
    if head_dim == old:
        return
    if head_dim != 2 * old:
        raise ValueError(f"--index-dim {head_dim}: only doubling the model's {old} is supported")
    cfg.index_head_dim = head_dim
    for blk in model.layers:
        ix = blk.attn.indexer
        wk = ix.wk.weight  # [old, dim]
        ix.wk = torch.nn.Linear(wk.shape[1], head_dim, bias=False)
        ix.wk.weight.copy_(torch.cat([wk, 2 * wk.mean(0, keepdim=True).expand_as(wk) - wk]))
        ln = ix.k_norm
        ix.k_norm = torch.nn.LayerNorm(head_dim, eps=ln.eps)
        ix.k_norm.weight.copy_(torch.cat([ln.weight, ln.weight]))
        ix.k_norm.bias.copy_(torch.cat([ln.bias, ln.bias]))
        wq = ix.wq_b.weight.view(ix.n_heads, old, -1)
        ix.wq_b = torch.nn.Linear(wq.shape[-1], ix.n_heads * head_dim, bias=False)
        ix.wq_b.weight.copy_(torch.cat([wq, torch.zeros_like(wq)], 1).reshape(-1, wq.shape[-1]))
        if cfg.index_score != "relu":  # queries() scales q by head_dim^-1/2; w is a log-weight
            ix.wq_b.weight.mul_((head_dim / old) ** 0.5)
        else:  # queries() folds head_dim^-1/2 into w
            ix.weights_proj.weight.mul_((head_dim / old) ** 0.5)
        ix.head_dim = head_dim


def fit(args) -> None:
    torch.manual_seed(args.seed)
    model = load_any(args.model).train()
    if args.index_score:
        model.cfg.index_score = args.index_score  # the modules share this config object
    if args.index_heads:
        grow_index_heads(model, args.index_heads, args.seed)
    if args.index_dim:
        grow_index_dim(model, args.index_dim)
    for n_, p_ in model.named_parameters():
        p_.requires_grad_(".indexer." in n_)
    params = [p_ for p_ in model.parameters() if p_.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    # Each --data dir is drawn equally often (a few costly long examples next to many short ones);
    # the first --held-out examples of each dir are kept out for the recall.
    rng = random.Random(args.seed)
    held, train = [], []
    for d in args.data.split(","):
        recs = load_dir(d)
        rng.shuffle(recs)
        held += recs[: args.held_out]
        train.append(recs[args.held_out:])
    print(f"{[len(t) for t in train]} training examples, {len(held)} held out", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps({**vars(args), "argv": sys.argv}, indent=1))
    L, topk = model.cfg.num_hidden_layers, model.cfg.index_topk
    rot = {}

    def rotary(T):
        if T not in rot:
            rot[T] = model.rotary(torch.arange(T)[None], torch.float32)
        return rot[T]

    def evaluate():
        model.eval()
        with torch.no_grad():
            per = [[0.0, 0.0, 0.0, 0] for _ in range(L)]
            qa = []
            for rec in held:
                cos, sin = rotary(rec["T"])
                for li, blk in enumerate(model.layers):
                    r = indexer_loss(blk.attn.indexer, rec, li, cos, sin, args.qa_weight, topk, want_recall=True)
                    if "recall" in r:
                        per[li][0] += float(r["kl"])
                        per[li][1] += r["recall"]
                        per[li][2] += r["mass"]
                        per[li][3] += 1
                        if r["qa_recall"] == r["qa_recall"]:  # not nan
                            qa.append(r["qa_recall"])
        model.train()
        n = max(1, per[0][3])
        return {"kl": sum(p[0] for p in per) / L / n, "recall_per_layer": [round(p[1] / n, 4) for p in per],
                "recall": sum(p[1] for p in per) / L / n, "mass": sum(p[2] for p in per) / L / n,
                "qa_recall": sum(qa) / max(1, len(qa))}

    fcsv = open(out / "log.csv", "w", newline="")
    wr = csv.DictWriter(fcsv, fieldnames=["step", "kl", "held_kl", "held_recall", "held_mass", "held_qa_recall",
                                          "recall_per_layer", "lr", "elapsed_s"])
    wr.writeheader()
    ev = evaluate()
    print(json.dumps({"step": 0, **ev}), flush=True)
    wr.writerow({"step": 0, "held_kl": round(ev["kl"], 5), "held_recall": round(ev["recall"], 5),
                 "held_mass": round(ev["mass"], 5), "held_qa_recall": round(ev["qa_recall"], 5),
                 "recall_per_layer": ev["recall_per_layer"]})
    t0, run = time.time(), []
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, warmup=0)
        for g in opt.param_groups:
            g["lr"] = lr
        pool = train[rng.randrange(len(train))]
        rec = pool[rng.randrange(len(pool))]
        cos, sin = rotary(rec["T"])
        loss = sum(indexer_loss(blk.attn.indexer, rec, li, cos, sin, args.qa_weight, topk,
                                keep=args.target_keep, flat=args.target_flat)["kl"]
                   for li, blk in enumerate(model.layers)) / L
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run.append(float(loss.detach()))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            ev = evaluate()
            row = {"step": step + 1, "kl": round(sum(run) / len(run), 5), "held_kl": round(ev["kl"], 5),
                   "held_recall": round(ev["recall"], 5), "held_mass": round(ev["mass"], 5),
                   "held_qa_recall": round(ev["qa_recall"], 5), "recall_per_layer": ev["recall_per_layer"],
                   "lr": lr, "elapsed_s": round(time.time() - t0, 1)}
            run = []
            wr.writerow(row)
            fcsv.flush()
            print(json.dumps(row), flush=True)
            torch.save({"cfg": model.cfg, "model": model.state_dict(), "step": step + 1}, out / "ckpt.pt")
    if args.export:
        export(model, args.export)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="run the frozen model over examples, cache what the indexer learns from")
    c.add_argument("--model", default="dsa-tiny")
    c.add_argument("--out", required=True)
    c.add_argument("--n", type=int, default=20, help="examples")
    c.add_argument("--len", default="8192:32768", help="context length range lo:hi")
    c.add_argument("--rows", type=int, default=384, help="query rows per example (question/answer rows + sampled)")
    c.add_argument("--keep", type=int, default=2048, help="largest p_t entries kept per row (0 = all)")
    c.add_argument("--tasks", default=",".join(data.TASKS))
    c.add_argument("--task-weights", default="6,3,1,1,1,2")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=2)
    f = sub.add_parser("fit", help="fit the indexers on cached examples")
    f.add_argument("--model", default="dsa-tiny")
    f.add_argument("--data", required=True, help="comma-separated collect dirs (each drawn equally often)")
    f.add_argument("--out", required=True)
    f.add_argument("--steps", type=int, default=1000)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--qa-weight", type=float, default=4.0, help="weight of question/answer rows in the KL")
    f.add_argument("--held-out", type=int, default=4, help="examples of each dir kept out of training, for the recall")
    f.add_argument("--eval-every", type=int, default=100)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=int, default=2)
    f.add_argument("--target-keep", type=int, default=0, help="cut the cached p_t to its N largest entries (0 = as cached)")
    f.add_argument("--target-flat", type=float, default=0.0, help="mix this much of the uniform distribution over those entries into the target")
    f.add_argument("--index-heads", type=int, default=0, help="grow each indexer to this many heads first (0 = keep; mixtures: a multiple of the heads, by copying)")
    f.add_argument("--index-dim", type=int, default=0, help="double each indexer's head dim first (0 = keep)")
    f.add_argument("--index-score", choices=INDEX_SCORES, default=None,
                   help="fit the indexers with this way of combining their heads (default: the model's)")
    f.add_argument("--export", default=None, help="save the weights here (the service's layout)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    (collect if a.cmd == "collect" else fit)(a)


if __name__ == "__main__":
    main()
