"""Synthetic long-document question answering in the RULER style, written by this file (no
downloads), formatted exactly as the service prompts the model:

    <bos> (<doc> name \\n text </doc>)* <question> q <answer> answer <eos>

Tasks (`TASKS`): niah_single, niah_multikey, niah_multivalue, niah_multiquery, variable tracking
(vt) and fact questions over tables / key-value lists (fact). Facts are planted in varied natural
templates ("The X of Y is Z.", "Y's X: Z", "Z is the X of Y", table rows, key-value lists) inside
filler that a small grammar writes (several documents per context, varied vocabulary).

    .venv/bin/python -m dsa_rag.model.training.data --task niah_single --tokens 1024     # print one example
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

import torch

from dsa_rag.model.tokenizer import ByteTokenizer

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "fact")
# Training-only tasks that teach copying from the documents with a dense signal (most of their
# answer is a copy of document text): recite (repeat a short document word for word) and quote
# (find the sentence about X and repeat it). Induction heads form much sooner with them.
AUX_TASKS = ("recite", "quote")

# ---------------------------------------------------------------- vocabulary
_SYL = ("ka", "lo", "mi", "ren", "tas", "vor", "qui", "bel", "dan", "sef", "ur", "ol", "tin", "gar", "pe", "nox",
        "zu", "ha", "mer", "cal", "ith", "ro", "wen", "fa", "dor", "li", "sa", "bri", "ton", "ve", "ex", "ny")
_ATTRS = ("access code", "budget", "serial number", "room number", "launch date", "owner", "password", "capital",
          "favorite color", "head office", "project lead", "license key", "phone extension", "batch number",
          "secret word", "founding year", "zip code", "flight number", "order id", "magic number", "codename",
          "contract value", "tax id", "locker number", "mascot")
_WORDS = ("amber", "falcon", "velvet", "harbor", "cobalt", "meadow", "orchid", "granite", "saffron", "willow",
          "ember", "lantern", "quartz", "tundra", "juniper", "marble", "pepper", "sparrow", "violet", "canyon",
          "maple", "thunder", "copper", "lotus", "glacier", "raven", "indigo", "cedar", "comet", "olive")
_SUBJ = ("the committee", "our team", "the northern office", "a senior reviewer", "the survey", "the board",
         "the engineers", "a local historian", "the finance group", "the auditors", "the project manager",
         "several customers", "the new intern", "the research lab", "the city council", "the editor",
         "most participants", "the legal department", "the field crew", "an outside consultant")
_VERB = ("reported", "noted", "argued", "observed", "confirmed", "suggested", "explained", "recalled",
         "announced", "estimated", "warned", "agreed", "mentioned", "concluded", "claimed")
_TOPIC = ("quarterly revenue", "the shipping schedule", "the old bridge", "customer feedback", "the river valley",
          "energy prices", "the spring festival", "the hiring plan", "the museum archive", "rainfall",
          "the migration of birds", "supply costs", "the software release", "the harbor expansion",
          "the school budget", "traffic on the main road", "the library renovation", "the wheat harvest",
          "the annual audit", "the mountain trail", "the new warehouse", "the printing press", "the orchard")
_CHANGE = ("grew", "fell", "stayed flat", "improved", "slowed down", "doubled", "recovered", "became uncertain",
           "changed little", "rose sharply", "declined slowly", "was delayed", "moved ahead of plan")
_WHEN = ("last spring", "during the winter", "in the third quarter", "after the storm", "over the past decade",
         "before the merger", "this year", "in recent weeks", "at the start of the season", "since the reform")
_ADV = ("quietly", "clearly", "again", "unexpectedly", "gradually", "once more", "in detail", "at length", "briefly")
_OPEN = ("Meanwhile,", "However,", "In addition,", "As a result,", "At the same time,", "Later,", "By contrast,",
         "For this reason,", "Even so,", "In short,")
_NOUN = ("a map", "the letter", "an old ledger", "the blue folder", "a small garden", "the west wing", "a crate",
         "the harbor office", "a wooden box", "the main hall", "a notebook", "the train station")
_DOCNAMES = ("report", "notes", "minutes", "memo", "summary", "letter", "chapter", "log", "review", "brief")


def _name(rng: random.Random, n: int | None = None) -> str:
    return "".join(rng.choice(_SYL) for _ in range(n or rng.randint(2, 3))).capitalize()


def _entity(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.4:
        return _name(rng)
    if r < 0.7:
        return f"{_name(rng)} {_name(rng)}"
    return f"{rng.choice(('Project', 'Station', 'Team', 'Unit', 'Hotel', 'Lake', 'Fort'))} {_name(rng)}"


def _value(rng: random.Random, kind: str | None = None) -> str:
    kind = kind or rng.choice(("num", "num", "code", "word"))
    if kind == "num":
        return str(rng.randint(10 ** (rng.randint(3, 6)), 10 ** 7 - 1))
    if kind == "code":
        a = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
        return "".join(rng.choice(a) for _ in range(3)) + "-" + "".join(rng.choice(a) for _ in range(rng.randint(2, 4)))
    return rng.choice(_WORDS) + ("" if rng.random() < 0.5 else "-" + rng.choice(_WORDS))


def filler_sentence(rng: random.Random, names: tuple[str, ...] = ()) -> str:
    """One sentence of filler. With `names`, a third of the sentences have one of them as subject:
    real documents mention their people and places again and again, and copying a name seen
    earlier is the in-context skill the QA tasks need (it trains the induction heads densely)."""
    t = rng.randrange(6)
    s, v, tp = rng.choice(_SUBJ), rng.choice(_VERB), rng.choice(_TOPIC)
    if names and rng.random() < 1 / 3:
        s = rng.choice(names)
    if t == 0:
        out = f"{s} {v} that {tp} {rng.choice(_CHANGE)} {rng.choice(_WHEN)}."
    elif t == 1:
        out = f"{rng.choice(_OPEN)} {s} {v} {rng.choice(_ADV)} about {tp}."
    elif t == 2:
        out = f"{tp} {rng.choice(_CHANGE)} {rng.choice(_WHEN)}, as {s} {v}."
    elif t == 3:
        out = f"{s} found {rng.choice(_NOUN)} near {rng.choice(_NOUN)} and {v} it to {rng.choice(_SUBJ)}."
    elif t == 4:
        out = f"{rng.choice(_WHEN)}, {s} {v} that nobody expected {tp} to matter so much."
    else:
        out = f"According to {s}, {tp} {rng.choice(_CHANGE)} while {rng.choice(_TOPIC)} {rng.choice(_CHANGE)}."
    return out[0].upper() + out[1:]


# ---------------------------------------------------------------- fact templates
def render_fact(rng: random.Random, ent: str, attr: str, val: str, style: int | None = None) -> str:
    """One fact in one of several natural surface forms."""
    forms = (f"The {attr} of {ent} is {val}.",
             f"{ent}'s {attr}: {val}.",
             f"{val} is the {attr} of {ent}.",
             f"For the record, the {attr} of {ent} is {val}.",
             f"We were told that {ent}'s {attr} is {val}.",
             f"- {ent} / {attr}: {val}",
             f"Note: {ent} has {val} as its {attr}.")
    return forms[rng.randrange(len(forms)) if style is None else style % len(forms)]


def render_question(rng: random.Random, ent: str, attr: str) -> str:
    forms = (f"What is the {attr} of {ent}?", f"What is {ent}'s {attr}?", f"Tell me the {attr} of {ent}.",
             f"{ent}: what is its {attr}?", f"Which {attr} does {ent} have?")
    return rng.choice(forms)


def render_table(rng: random.Random, rows: list[tuple[str, str, str]]) -> str:
    """rows (entity, attr, value) -> a markdown table or a key-value list."""
    if rng.random() < 0.5:
        lines = ["| name | field | value |", "|---|---|---|"] + [f"| {e} | {a} | {v} |" for e, a, v in rows]
    else:
        lines = [f"* {e}, {a} = {v}" for e, a, v in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- examples
@dataclass
class Example:
    documents: list[tuple[str, str]]
    question: str
    answer: str
    task: str
    # Values (or, for vt, variable names) planted in the documents that are not the answer: what a
    # model that found the needles but confused them would say. Drawn without touching the rng, so
    # adding this field left every seeded example as it was.
    distractors: tuple[str, ...] = ()

    def ids(self, tok: ByteTokenizer) -> list[int]:
        return tok.prompt_ids(self.documents, self.question) + tok.encode(self.answer) + [tok.eos_id]


def _needles(rng: random.Random, task: str) -> tuple[list[str], str, str, tuple[str, ...]]:
    """-> (needle snippets in document order, question, answer, distractor values)."""
    if task in ("niah_single", "niah_multikey"):
        ent, attr, val = _entity(rng), rng.choice(_ATTRS), _value(rng)
        needles, others = [render_fact(rng, ent, attr, val)], []
        if task == "niah_multikey":  # distractors: same attribute other entities, same entity other attributes
            for _ in range(rng.randint(3, 6)):
                e2 = ent if rng.random() < 0.25 else _entity(rng)
                a2 = rng.choice([a for a in _ATTRS if a != attr]) if e2 == ent else attr
                others.append(_value(rng))
                needles.append(render_fact(rng, e2, a2, others[-1]))
            rng.shuffle(needles)
        return needles, render_question(rng, ent, attr), val, tuple(others)
    if task == "niah_multivalue":
        ent, attr = _entity(rng), rng.choice(_ATTRS)
        vals = [_value(rng) for _ in range(rng.randint(2, 4))]
        needles = [f"One of the {attr} values of {ent} is {v}." if rng.random() < 0.5 else
                   f"{ent} also lists {v} as a {attr}." for v in vals]
        q = f"What are all the {attr} values of {ent}?"
        return needles, q, ", ".join(vals), ()
    if task == "niah_multiquery":
        attr = rng.choice(_ATTRS)
        facts = [(_entity(rng), attr, _value(rng)) for _ in range(rng.randint(2, 3))]
        needles = [render_fact(rng, *f) for f in facts]
        order = list(range(len(facts)))
        rng.shuffle(order)
        names = [facts[i][0] for i in order]
        q = f"What are the {attr} values of {', '.join(names[:-1])} and {names[-1]}?"
        ans = ", ".join(facts[i][2] for i in order)
        rng.shuffle(needles)
        return needles, q, ans, ()
    if task == "vt":
        val = str(rng.randint(10000, 99999))
        names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(rng.randint(2, 4))]
        needles = [f"VAR {names[0]} = {val}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
        # a distractor chain with another value
        d = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(2)]
        needles += [f"VAR {d[0]} = {rng.randint(10000, 99999)}.", f"VAR {d[1]} = VAR {d[0]}."]
        q = f"Which variables are assigned the value {val}? List them in order."
        return needles, q, ", ".join(names), (", ".join(d),)
    if task == "quote":
        ent, attr, val = _entity(rng), rng.choice(_ATTRS), _value(rng)
        fact = render_fact(rng, ent, attr, val)
        q = rng.choice((f"Quote the sentence about the {attr} of {ent}.", f"Which line mentions {ent}'s {attr}?",
                        f"Repeat what the documents say about the {attr} of {ent}."))
        return [fact], q, fact, ()
    if task == "fact":
        rows = [(_entity(rng), rng.choice(_ATTRS), _value(rng)) for _ in range(rng.randint(3, 6))]
        i = rng.randrange(len(rows))
        e, a, v = rows[i]
        return [render_table(rng, rows)], render_question(rng, e, a), v, tuple(r[2] for j, r in enumerate(rows) if j != i)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def recite_example(rng: random.Random, n_tokens: int) -> Example:
    """A short document of names, values and filler phrases (at most a quarter of n_tokens, 200
    bytes) and the question to repeat it word for word."""
    size = rng.randint(12, max(12, min(200, n_tokens // 4)))
    parts: list[str] = []
    while sum(len(p) + 1 for p in parts) < size:
        r = rng.random()
        parts.append(_entity(rng) if r < 0.35 else _value(rng) if r < 0.7 else filler_sentence(rng)[: rng.randint(8, 40)].strip())
    text = " ".join(parts)[:size].strip()
    q = rng.choice(("Repeat the document word for word.", "Copy the text of the document.", "What does the document say?"))
    return Example([(f"{rng.choice(_DOCNAMES)}_1.txt", text)], q, text, "recite")


def make_example(rng: random.Random, task: str, n_tokens: int, tok: ByteTokenizer | None = None,
                 depth: float | None = None) -> Example:
    """An example whose prompt + answer is about n_tokens tokens (bytes) long. Needles go in order
    (ordered tasks keep their order), at a random depth, or the first one at `depth` (0..1).
    `recite` examples are short whatever n_tokens is."""
    tok = tok or ByteTokenizer()
    if task == "recite":
        return recite_example(rng, n_tokens)
    needles, question, answer, distractors = _needles(rng, task)
    # Names that the filler mentions (other entities than the needles').
    names = tuple(_entity(rng) for _ in range(rng.randint(1, 3)))
    n_docs = max(1, min(rng.randint(1, 4), n_tokens // 200 or 1))
    overhead = 1 + len(question) + 2 + len(answer) + 1 + n_docs * 24 + sum(len(n) + 1 for n in needles)
    budget = max(0, n_tokens - overhead)
    # Filler sentences for the whole context, then needles dropped between sentences.
    sents, size = [], 0
    while size < budget:
        s = filler_sentence(rng, names)
        sents.append(s)
        size += len(s) + 1
    if sents and size > budget:  # trim the last sentence so the total length is close to n_tokens
        cut = len(sents[-1]) - (size - budget)
        sents[-1] = sents[-1][: max(0, cut)]
        if not sents[-1]:
            sents.pop()
    n = len(sents)
    if depth is not None:
        first = int(depth * n)
        slots = sorted([first] + [rng.randint(first, n) for _ in needles[1:]])
    else:
        slots = sorted(rng.randint(0, n) for _ in needles)
    items = list(sents)
    for k, (slot, nd) in enumerate(zip(slots, needles)):
        items.insert(slot + k, nd)
    # Split into documents at sentence boundaries, paragraphs every few sentences; each document is
    # laid out as prose, one sentence per line, or hard-wrapped lines (what text extracted from a
    # PDF looks like), so the model reads all three the same.
    cuts = sorted(rng.sample(range(1, len(items)), min(n_docs - 1, max(0, len(items) - 1)))) if len(items) > 1 else []
    docs, prev = [], 0
    for i, c in enumerate(cuts + [len(items)]):
        part = items[prev:c]
        prev = c
        text, para, prev_s = "", 0, ""
        for s in part:
            listy = s.startswith(("|", "*", "- ")) or prev_s.startswith(("|", "*", "- "))
            sep = "" if not text else ("\n" if listy else ("\n\n" if para >= rng.randint(3, 7) else " "))
            para = 0 if sep == "\n\n" else para + 1
            text, prev_s = text + sep + s, s
        layout = rng.random()
        if layout < 0.2:
            text = text.replace(". ", ".\n")
        elif layout < 0.4:
            text = hard_wrap(text, rng.randint(50, 100))
        docs.append((f"{rng.choice(_DOCNAMES)}_{i + 1}.{rng.choice(('txt', 'md', 'pdf'))}", text))
    return Example(docs, question, answer, task, distractors)


def hard_wrap(text: str, width: int) -> str:
    """Break every line longer than width at its last space before width (the same length: a
    space becomes a newline)."""
    out = []
    for line in text.split("\n"):
        while len(line) > width and " " in line[1:width + 1]:
            cut = line.rindex(" ", 1, width + 1)
            out.append(line[:cut])
            line = line[cut + 1:]
        out.append(line)
    return "\n".join(out)


def encode(ex: Example, tok: ByteTokenizer) -> tuple[list[int], int]:
    """-> (ids, answer_start): ids[answer_start:] is the answer + <eos> (what the loss weights most)."""
    prompt = tok.prompt_ids(ex.documents, ex.question)
    return prompt + tok.encode(ex.answer) + [tok.eos_id], len(prompt)


def batch(rng: random.Random, n_tokens: int, batch_tokens: int, tasks=TASKS, weights=None,
          tok: ByteTokenizer | None = None, doc_weight: float = 0.1, question_weight: float | None = None,
          first_answer_weight: float = 1.0):
    """One task per batch (rows of similar length, little padding), as many rows of about n_tokens
    as fit in batch_tokens (at least one). -> (input_ids [B, T], targets [B, T], loss_w [B, T]):
    answer tokens weigh 1, document tokens doc_weight, question tokens question_weight (default:
    doc_weight; the question repeats names and fields from the documents, so a higher weight is
    more copying signal), padding 0. Weights stay < 1 except on the answer. The answer's first
    token weighs first_answer_weight (>= 1): it is the one the model must find by matching the
    question against the documents; the rest of the answer is mostly copied on from there."""
    q_w = doc_weight if question_weight is None else question_weight
    if not 0 <= doc_weight < 1 or not 0 <= q_w < 1 or first_answer_weight < 1:
        raise ValueError("doc_weight and question_weight must be in [0, 1) and first_answer_weight >= 1: "
                         "weight >= 1 marks the answer")
    tok = tok or ByteTokenizer()
    task = rng.choices(tasks, weights=weights)[0]
    rows, used = [], 0
    while not rows or used + max(len(r[0]) for r in rows) <= batch_tokens:
        ids, a0 = encode(make_example(rng, task, n_tokens, tok), tok)
        rows.append((ids, a0))
        used = len(rows) * max(len(r[0]) for r in rows)
    if len(rows) > 1 and used > batch_tokens:
        rows.pop()
    T = max(len(r[0]) for r in rows) - 1
    x = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
    w = torch.zeros(len(rows), T)
    q_id = tok.special("<question>")
    for b, (ids, a0) in enumerate(rows):
        n = len(ids) - 1
        x[b, :n] = torch.tensor(ids[:-1])
        y[b, :n] = torch.tensor(ids[1:])
        w[b, :n] = doc_weight
        q0 = len(ids) - 1 - ids[::-1].index(q_id)  # the question's tokens are targets q0..a0-2
        w[b, q0: a0 - 1] = q_w
        w[b, a0 - 1: n] = 1.0  # targets at positions a0-1.. are the answer tokens and <eos>
        w[b, a0 - 1] = first_answer_weight
    return x, y, w


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="niah_single", choices=TASKS)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    tk = ByteTokenizer()
    ex = make_example(random.Random(a.seed), a.task, a.tokens, tk)
    ids, a0 = encode(ex, tk)
    print(tk.decode(ids, skip_special=False))
    print(f"\n[{len(ids)} tokens, answer starts at {a0}: {ex.answer!r}]")
