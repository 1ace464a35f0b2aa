"""Train dsa-tiny with the DSA recipe of the DeepSeek-V3.2 report, at small scale, on the synthetic
long-document QA of model/training/data.py:

  stage 0  dense training at short context (the indexer is unused), LM loss;
  stage 1  indexer warm-up: dense attention, everything frozen but the indexer, which learns
           KL(p_t || softmax(I_t)), p_t = attention summed over heads, L1-normalized;
  stage 2  sparse training: top-k selection by the indexer, indexer input detached; the indexer
           learns the KL restricted to the selected set, the rest of the model the LM loss.

LM loss = mean CE over the answer tokens (+ <eos>) + doc_coef * mean CE over the document tokens
(a little LM loss on the documents helps the copying/induction heads form). The training attention
(`mla_train`, from the pieces in model/training/attention.py) uses explicit [B, H, T, T] scores, or
with --sparse-chunk stage 2's gathered top-k keys (model/training/sparse_train.py), so
model/model.py stays inference-only; `dsa_rag.model.load.save_checkpoint` writes the result in the
HF layout.

One stage per call; resumable (`<out>/ckpt.pt` is written every --ckpt-every steps and at the end;
run the same command again to continue). Logs: <out>/log.jsonl and <out>/log.csv.

    # tiny CPU smoke run
    .venv/bin/python -m dsa_rag.model.training.train --stage 0 --steps 3 --out tmp/smoke --tokens 512 --len 128:256 --tiny
    # the dsa-tiny recipe: see model/weights/dsa-tiny/MODEL_CARD.md for the exact commands
    .venv/bin/python -m dsa_rag.model.training.train --stage 0 --steps 3000 --out tmp/run/s0 --len 256:1024
    .venv/bin/python -m dsa_rag.model.training.train --stage 1 --steps 200 --init tmp/run/s0 --out tmp/run/s1 --len 1024:1024
    .venv/bin/python -m dsa_rag.model.training.train --stage 2 --steps 600 --init tmp/run/s1 --out tmp/run/s2 --len 512:2048 \\
        --export model/weights/dsa-tiny
    .venv/bin/python -m pytest -q tests/model/training/test_train.py
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dsa_rag.model.config import preset
from dsa_rag.model.load import build_model, load_any, save_checkpoint
from dsa_rag.model.model import Transformer
from dsa_rag.model.tokenizer import ByteTokenizer
from dsa_rag.model.training import data
from dsa_rag.model.training.attention import attention_target, index_scores, indexer_kl, mla_qkv, sdpa
from dsa_rag.model.training.sparse_train import mla_sparse_train


# ---------------------------------------------------------------- training-time attention
def mla_train(attn, x, cos, sin, stage: int, causal, stats: dict, rows=None):
    """MLA forward for training. x [B, T, dim]; causal [T, T] bool. Adds indexer KL terms to
    stats['kl'] (stages 1, 2) and selection recall bookkeeping. rows (stage 1 only; default every
    row): the query indices [R] whose indexer KL is computed; the [B, H, T, T] scores of a long
    context would not fit, [B, H, R, T] do, and the attention output goes through the flash kernel."""
    if stage == 2 and stats.get("sparse_chunk"):  # O(T k) memory: gather each row's selected keys
        return mla_sparse_train(attn, x, cos, sin, stats, stats["sparse_chunk"])
    B, T, _ = x.shape
    H, dv = attn.n_heads, attn.dv
    qr, q, k, v = mla_qkv(attn, x, cos, sin)
    if stage in (0, 1):
        o = sdpa(q, k, v, None, attn.scale)
        if stage == 1:  # dense attention; the indexer's KL over all causal keys of the chosen rows
            rows = torch.arange(T, device=x.device) if rows is None else rows
            causal_r = causal[rows]
            I = index_scores(attn.indexer, x.detach(), qr.detach(), cos, sin, rows).masked_fill(~causal_r, float("-inf"))
            p = attention_target(q[:, :, rows], k, causal_r, attn.scale)
            indexer_kl(p, I, causal_r.expand_as(I), causal_r, attn.cfg.index_topk, stats)
        return attn.wo(o.transpose(1, 2).reshape(B, T, H * dv))

    # Stage 2. Indexer on detached inputs: it learns from its KL only, never moves the main model.
    I = index_scores(attn.indexer, x.detach(), qr.detach(), cos, sin).masked_fill(~causal, float("-inf"))
    topk = attn.cfg.index_topk
    if T > topk:
        sel = torch.zeros_like(I, dtype=torch.bool).scatter_(-1, I.detach().topk(topk, -1)[1], True) & causal
    else:
        sel = causal.expand(B, T, T)
    # Target over the selected set; the output goes through SDPA.
    p = attention_target(q, k, sel[:, None], attn.scale)
    indexer_kl(p, I, sel, causal, topk, stats)
    o = sdpa(q, k, v, None if T <= topk else sel[:, None], attn.scale)
    return attn.wo(o.transpose(1, 2).reshape(B, T, H * dv))


def forward_train(model: Transformer, x, stage: int, stats: dict, positions=None, rows=None):
    """input_ids [B, T] -> logits [B, T, vocab] fp32, with the training attention. positions [B, T]
    (default 0..T-1): RoPE positions, increasing along each row (see skip_positions)."""
    B, T = x.shape
    pos = torch.arange(T, device=x.device)[None].expand(B, T) if positions is None else positions
    h = model.embed(x)
    cos, sin = model.rotary(pos, h.dtype)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    for blk in model.layers:
        h = h + mla_train(blk.attn, blk.attn_norm(h), cos, sin, stage, causal, stats, rows)
        h = h + blk.ffn(blk.ffn_norm(h))
    return model.head(model.norm(h).float())


def losses(model, x, y, w, stage: int, doc_coef: float, want_recall=False, positions=None, rows=None,
           sparse_chunk: int = 0):
    """sparse_chunk (stage 2): use the O(T k) gathered attention of model/training/sparse_train.py, in row
    chunks of this size, instead of the dense-masked one (0)."""
    stats = {"want_recall": want_recall, "sparse_chunk": sparse_chunk if stage == 2 else 0}
    logits = forward_train(model, x, stage, stats, positions, rows)
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    ans, doc = w >= 1, (w > 0) & (w < 1)
    # Weighted means of CE: over the answer (its first token may weigh more) and over the
    # document and question tokens (question tokens may weigh more).
    lm = (ce * w)[ans].sum() / w[ans].sum() + doc_coef * ((ce * w)[doc].sum() / w[doc].sum() if doc.any() else 0.0)
    # Exact match of the answer under teacher forcing == greedy decoding gets the whole answer right.
    ok = ((logits.argmax(-1) == y) | ~ans).all(-1).float().mean()
    out = {"lm": lm, "ans_ce": ce[ans].mean().detach(), "doc_ce": ce[doc].mean().detach() if doc.any() else torch.tensor(0.0),
           "ans_acc": ok}
    if "kl" in stats:
        valid = (w > 0).float() if rows is None else (w > 0).float()[:, rows]
        out["kl"] = sum((k * valid).sum() / valid.sum() for k in stats["kl"]) / len(stats["kl"])
    if stats.get("recall"):
        out["recall"] = sum(stats["recall"]) / len(stats["recall"])
        out["mass"] = sum(stats["mass"]) / len(stats["mass"])
    return out


def question_start(row, q_id: int) -> int:
    """Index of the last <question> token in a row of input ids (its length if there is none)."""
    q = (row == q_id).nonzero()
    return int(q[-1]) if len(q) else len(row)


def skip_positions(rng: random.Random, x, q_id: int, max_pos: int, p_skip: float = 0.8, max_cuts: int = 3):
    """PoSE-style RoPE positions [B, T] (Zhu et al. 2023): each row's documents are cut at 1..max_cuts
    random points and the positions jump forward there, by gaps summing to at most max_pos - T, so
    a T-token example shows the model query-key distances of a max_pos-token context (RoPE sees
    only distances). The question and answer stay one contiguous run after the last cut. A row
    keeps plain positions with probability 1 - p_skip, so short distances stay trained too."""
    B, T = x.shape
    pos = torch.arange(T)[None].repeat(B, 1)
    room = max_pos - T
    if room <= 0:
        return pos
    for b in range(B):
        q0 = question_start(x[b], q_id)
        if q0 < 3 or rng.random() >= p_skip:
            continue
        cuts = sorted(rng.sample(range(1, q0), min(q0 - 1, rng.randint(1, max_cuts))))
        total = rng.randint(0, room)
        shares = sorted(rng.randint(0, total) for _ in range(len(cuts) - 1))
        gaps = [hi - lo for lo, hi in zip([0] + shares, shares + [total])]
        for c, g in zip(cuts, gaps):
            pos[b, c:] += g
    return pos


def index_rows(rng: random.Random, x, q_id: int, n_rows: int):
    """Query rows [R] for a stage-1 step on a long context: every question and answer row (the
    ones whose selection decides the answer) and a random sample of document rows."""
    B, T = x.shape
    q0 = min(question_start(x[b], q_id) for b in range(B))
    doc = rng.sample(range(q0), max(0, min(q0, n_rows - (T - q0))))
    return torch.tensor(sorted(doc) + list(range(q0, T)))


# ---------------------------------------------------------------- driver
def parse_len(s: str) -> tuple[int, int]:
    a, _, b = s.partition(":")
    return int(a), int(b or a)


def tiny_cfg():
    return preset("dsa-tiny", hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, index_topk=64)


def lr_at(step, total, base, warmup):
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))))


def make_model(args, device):
    """The model a stage starts from: --init (a previous stage's run dir or a weights dir), else a
    random init of --preset (or of the --tiny config)."""
    if args.init:
        return load_any(args.init, device).train()
    cfg = tiny_cfg() if args.tiny else preset(args.preset)
    return build_model(cfg, device).init_weights(seed=args.seed)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, choices=(0, 1, 2), required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--out", required=True, help="run dir (ckpt.pt, log.jsonl, log.csv)")
    ap.add_argument("--init", default=None, help="previous stage's run dir or a weights dir (default: random init)")
    ap.add_argument("--preset", default="dsa-tiny")
    ap.add_argument("--tiny", action="store_true", help="a very small config (tests)")
    ap.add_argument("--len", default="256:1024", help="context length range lo:hi; hi ramps up over the first 60%% of steps")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch = rows of the step's length that fit)")
    ap.add_argument("--lr", type=float, default=None, help="default: 1e-3 (stage 0, 1), 3e-4 (stage 2)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--doc-coef", type=float, default=0.2)
    ap.add_argument("--question-weight", type=float, default=0.5,
                    help="weight of question tokens relative to document tokens (0.5) in the document loss")
    ap.add_argument("--first-answer-weight", type=float, default=1.0,
                    help="weight of the answer's first token relative to the rest of the answer")
    ap.add_argument("--tasks", default=",".join(data.TASKS))
    ap.add_argument("--task-weights", default="3,2,1,1,1,2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--pose-max", type=int, default=0,
                    help="train with skipped positions spanning up to this many (PoSE; 0 = plain positions)")
    ap.add_argument("--pose-prob", type=float, default=0.8, help="share of rows with skipped positions")
    ap.add_argument("--sparse-chunk", type=int, default=0,
                    help="stage 2: gather each row's top-k keys (O(T k) memory, model/training/sparse_train.py) in row chunks "
                         "of this size; 0 = the dense-masked attention (O(T^2), fine up to ~4k tokens)")
    ap.add_argument("--index-rows", type=int, default=0,
                    help="stage 1: supervise only this many query rows per step (all question/answer rows + random "
                         "document rows), so contexts of 8k-32k real tokens fit (0 = every row)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU/GPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--export", default=None, help="save_checkpoint the final weights here (+ tokenizer_config.json)")
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"
    tok = ByteTokenizer()
    q_id = tok.special("<question>")
    tasks = args.tasks.split(",")
    tw = [float(v) for v in args.task_weights.split(",")][: len(tasks)] if args.task_weights else None
    lo, hi = parse_len(args.len)
    base_lr = args.lr or (3e-4 if args.stage == 2 else 1e-3)

    if ckpt_path.exists() and json.loads((out / "state.json").read_text()).get("stage") == args.stage:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model = build_model(ck["cfg"], device)
        model.load_state_dict(ck["model"])
        start, resumed = ck["step"], True
    else:
        torch.manual_seed(args.seed)
        model = make_model(args, device)
        ck, start, resumed = None, 0, False
    model.train()
    # Stage 1: only the indexer trains. Stages 0, 2: everything (stage 0 never touches the indexer).
    for n, p in model.named_parameters():
        p.requires_grad_((".indexer." in n) if args.stage == 1 else not n.endswith("gate.bias"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=base_lr, betas=(0.9, 0.95), weight_decay=0.1 if args.stage != 1 else 0.0)
    if ck is not None:
        opt.load_state_dict(ck["opt"])
    rng = random.Random(args.seed * 1000 + args.stage)
    if ck is not None:
        rng.setstate(ck["rng"])

    fields = ["step", "stage", "len", "batch", "loss", "lm", "ans_ce", "doc_ce", "ans_acc", "kl", "recall", "mass", "lr",
              "tok_s", "elapsed_s"]
    new_csv = not (out / "log.csv").exists() or not resumed
    fcsv = open(out / "log.csv", "a" if resumed else "w", newline="")
    wcsv = csv.DictWriter(fcsv, fieldnames=fields, extrasaction="ignore")
    if new_csv:
        wcsv.writeheader()
    fjs = open(out / "log.jsonl", "a" if resumed else "w")
    (out / "args.json").write_text(json.dumps({**vars(args), "argv": sys.argv, "device": device}, indent=1))

    try:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=start, desc=f"stage {args.stage}", file=sys.stderr, mininterval=5)
    except ImportError:  # pragma: no cover
        bar = None
    t_start, tokens_seen, acc = time.time(), 0, {}
    amp = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.bf16)

    def save(step):
        tmp = out / "ckpt.pt.tmp"
        torch.save({"cfg": model.cfg, "model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "rng": rng.getstate()}, tmp)
        os.replace(tmp, ckpt_path)
        (out / "state.json").write_text(json.dumps({"stage": args.stage, "step": step}))

    for step in range(start, args.steps):
        ramp = min(1.0, step / max(1, 0.6 * args.steps))
        cur_hi = int(lo + (hi - lo) * ramp)
        n = rng.randint(lo, max(lo, cur_hi))
        x, y, w = data.batch(rng, n, args.tokens, tasks, tw, tok, doc_weight=0.5,
                             question_weight=args.question_weight, first_answer_weight=args.first_answer_weight)
        bsz = x.shape[0]
        pos = skip_positions(rng, x, q_id, args.pose_max, args.pose_prob) if args.pose_max else None
        x, y, w = x.to(device), y.to(device), w.to(device)
        pos = pos.to(device) if pos is not None else None
        rows = (index_rows(rng, x, q_id, args.index_rows).to(device)
                if args.stage == 1 and args.index_rows and x.shape[1] > args.index_rows else None)
        lr = lr_at(step, args.steps, base_lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        want_recall = args.stage == 1 and (step + 1) % args.log_every == 0
        with amp:
            L = losses(model, x, y, w, args.stage, args.doc_coef, want_recall, pos, rows, args.sparse_chunk)
        loss = L["kl"] if args.stage == 1 else (L["lm"] + L["kl"] if args.stage == 2 else L["lm"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        tokens_seen += x.numel()
        for k_, v_ in L.items():
            acc.setdefault(k_, []).append(float(v_.detach() if torch.is_tensor(v_) else v_))
        acc.setdefault("loss", []).append(float(loss))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}", ans=f"{float(L['ans_acc']):.2f}", len=n)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            el = time.time() - t_start
            rec = {"step": step + 1, "stage": args.stage, "len": n, "batch": bsz, "lr": lr,
                   "tok_s": tokens_seen / el, "elapsed_s": el}
            rec.update({k_: sum(v_) / len(v_) for k_, v_ in acc.items() if not all(math.isnan(u) for u in v_)})
            acc = {}
            fjs.write(json.dumps(rec) + "\n")
            fjs.flush()
            wcsv.writerow({k_: (round(v_, 5) if isinstance(v_, float) else v_) for k_, v_ in rec.items()})
            fcsv.flush()
            if bar is None:
                print(json.dumps(rec), flush=True)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            save(step + 1)
    if bar is not None:
        bar.close()
    if args.export:
        export(model, args.export)
    return model


def export(model: Transformer, path: str | Path):
    """Weights dir the service loads: config.json + model.safetensors + tokenizer_config.json."""
    model = model.eval()
    d = save_checkpoint(model, path)
    (Path(d) / "tokenizer_config.json").write_text(json.dumps(ByteTokenizer().to_json(), indent=1))
    return d


if __name__ == "__main__":
    main()
