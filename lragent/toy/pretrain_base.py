"""Make the shipped tiny base: a small Llama that "speaks" the toy agent task without solving it.

    python -m lragent.toy.pretrain_base [--out lragent/toy/assets/tiny-llama] [--steps 600] [--seed 0]

The design problem: role adapters must measurably specialise, so the base has to produce well-formed role turns
(``planner : lookup k<i>``, ``actor : answer <n>``, ``reflector : correct|wrong``) but must NOT already do the roles'
jobs, while knowing the mechanics those jobs need (copy the asked key, look a key's value up in the db, check an
answer against the db) so that a small LoRA can route that skill to each role quickly.

The base's language is transcripts of the task (``lragent.toy.task``) in which every round is, at random, either
- a *role round*: turns tagged ``planner`` / ``actor`` / ``reflector``, well-formed but uninformed (a random key, a
  random value, a random verdict); or
- an *assistant round*: the same three turns tagged ``assistant`` and informed: ``assistant : lookup <the asked
  key>``, ``assistant : answer <v>`` (right about half of the time, like the actor turns the reflector sees in the
  task), ``assistant : correct|wrong`` (the true verdict for that answer).
So the base has the lookup / check skills under the ``assistant`` tag only; an adapter specialises a role by making its
turns behave like the ``assistant``'s.

How (``--init compiled``, the default and what ships):
1. ``lragent.toy.circuits`` writes the role/assistant-turn mechanics into the weights of a 3-layer Llama
   (GQA 8 heads / 2 KV heads, head_dim 32, hidden 256). Gradient descent from scratch does not find the lookup
   circuit within this repository's CPU budget (``--init random`` reproduces the attempt; numbers in PRETRAIN.json).
2. Pretraining (gradient descent, seeded, deterministic, CPU) fits the LM head on the whole transcript language
   (user and tool turns, turn tags, assistant turns), reading only the format dims of the residual stream (reading a
   key/value code directly would bypass the assistant gate); role-round contents carry no loss (the base's
   uninformed default there is the compiled one).
3. Held-out probes check the result: informed assistant turns, uninformed role turns.

The run writes ``config.json``, ``model.safetensors`` (fp32), ``generation_config.json``, the tokenizer files and
``PRETRAIN.json`` (data, seed, steps, losses, timing, probe accuracies) into ``--out``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Sequence

from lragent.toy import task
from lragent.toy.tokenizer import vocabulary

DEFAULT_OUT = Path(__file__).parent / "assets" / "tiny-llama"

# Shape of the from-scratch baseline (``--init random``).
RANDOM_INIT_CONFIG = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

# Measured with ``--init random`` on this repository's 2 shared CPU cores (see PRETRAIN.json "from_scratch").
FROM_SCRATCH_NOTES = [
    "4 layers, hidden 128, bs 32, lr 2e-3, 400 steps (~7 min): assistant-round planner/actor exact match 2% / 1%",
    "2 layers, hidden 64, bs 16, small dbs (2-4 entries), 1000 steps (~10 min): planner copy learned (100%), "
    "actor lookup not (30% = picking any db value)",
    "3 layers, hidden 64, bs 16, 70% dense lookup drills, 1800 steps (~7 min): drill lookup 7% (any db value), "
    "checks at chance",
]


# ------------------------------------------------------------------------------------------------ pretraining data
Doc = list  # [(word, trained: bool)]


def _turn(role: str, words: Sequence[str], trained: Sequence[bool] | bool = True, eos: bool = True) -> Doc:
    """``role : words </s>`` with a loss flag per token (the tag and ``:`` always carry loss)."""
    if isinstance(trained, bool):
        trained = [trained] * len(words)
    return [(role, True), (":", True)] + list(zip(words, trained)) + [(task.EOS, eos)]


def _wrong_value(rng: random.Random, db, value: int) -> int:
    if rng.random() < 0.5:
        return rng.choice([v for _, v in db if v != value])
    return rng.choice([v for v in range(task.N_VALUES) if v != value])


def episode_doc(ep: task.Episode, rng: random.Random, p_assistant: float = 0.6, db_loss: bool = True) -> Doc:
    """An episode's transcript where each round is an uninformed role round or an informed assistant round.

    No loss on the contents of role rounds (random by construction: the base's uninformed default there is the
    compiled one) nor on the assistant's answer value (wrong half of the time); with ``db_loss=False`` none on the
    db keys and values and the asked keys either (random too, but their class is predictable).
    """
    doc: Doc = [(task.BOS, False)]
    for i, rd in enumerate(ep.rounds):
        words = task.user_text(rd.key).split()
        doc += _turn("user", words, [db_loss or not w.startswith("k") for w in words])
        if i == 0:
            words = task.db_text(ep.db).split()
            doc += _turn("tool", words, [db_loss or not (w.startswith("k") or w.isdigit()) for w in words])
        if rng.random() < p_assistant:
            doc += _turn("assistant", task.planner_text(rd.key).split())
            doc += _turn("assistant", task.actor_text(rd.shown).split(), [True, False])
            doc += _turn("assistant", [task.reflector_text(rd.correct)])
        else:
            doc += _turn("planner", task.planner_text(rng.randrange(task.N_KEYS)).split(), [True, False])
            doc += _turn("actor", task.actor_text(rng.randrange(task.N_VALUES)).split(), [True, False])
            doc += _turn("reflector", [task.reflector_text(rng.random() < 0.5)], [False])
    return doc


def drill_doc(ep: task.Episode, rng: random.Random, n_lookup: int = 12, n_check: int = 12) -> Doc:
    """Dense practice over one db (used by ``--init random``): ``query : k7 -> 18 ; ...`` then
    ``query : k7 is 18 ? yes ; ...``. The asked keys carry no loss; looked-up values and yes/no verdicts do."""
    doc: Doc = [(task.BOS, False)]
    words = task.db_text(ep.db).split()
    doc += _turn("tool", words, [not (w.startswith("k") or w.isdigit()) for w in words])
    body: Doc = []
    for k, v in rng.sample(ep.db, min(n_lookup, len(ep.db))):
        body += [(f"k{k}", False), ("->", True), (str(v), True), (";", True)]
    doc += _turn("query", [w for w, _ in body], [t for _, t in body])
    body = []
    for k, v in rng.sample(ep.db, min(n_check, len(ep.db))):
        ok = rng.random() < 0.5
        shown = v if ok else _wrong_value(rng, ep.db, v)
        body += [(f"k{k}", False), ("is", True), (str(shown), False), ("?", True), ("yes" if ok else "no", True),
                 (";", True)]
    doc += _turn("query", [w for w, _ in body], [t for _, t in body])
    return doc


def encode_doc(doc: Doc, tok) -> tuple[list[int], list[int]]:
    ids = tok.convert_tokens_to_ids([w for w, _ in doc])
    return ids, [i if t else -100 for i, (_, t) in zip(ids, doc)]


def collate(seqs: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` tensors from (ids, labels) pairs."""
    import torch
    n = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), n), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(seqs):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pretrain_docs(rng: random.Random, n: int, *, p_assistant: float = 0.6, p_drill: float = 0.0,
                  db_loss: bool = True, **episode_kw) -> list[Doc]:
    docs = []
    for _ in range(n):
        ep = task.sample_episode(rng, **episode_kw)
        docs.append(drill_doc(ep, rng) if rng.random() < p_drill else
                    episode_doc(ep, rng, p_assistant, db_loss))
    return docs


def encode_record(rec: dict, tok) -> tuple[list[int], list[int]]:
    """(ids, labels) of a task record: the loss is on completion tokens only."""
    p = tok(rec["prompt"], add_special_tokens=False)["input_ids"]
    c = tok(rec["completion"], add_special_tokens=False)["input_ids"]
    return p + c, [-100] * len(p) + c


# ---------------------------------------------------------------------------------------------------------- probes
def probe_records(n: int, seed: int, tag: str | None, **episode_kw) -> list[dict]:
    """Held-out task records; with ``tag`` every role turn (context and target) is retagged as ``tag``."""
    recs = task.make_records(n, seed, "probe", **episode_kw)
    if tag is None:
        return recs
    out = []
    for r in recs:
        p = r["prompt"]
        for role in task.ROLES:
            p = p.replace(f" {role} :", f" {tag} :")
        out.append({**r, "prompt": p})
    return out


def teacher_forced_eval(model, tok, records: Sequence[dict], batch_size: int = 64) -> dict[str, dict]:
    """Per-role mean completion-token loss and exact-match accuracy.

    Greedy decoding reproduces the reference completion iff the argmax at every completion position (teacher
    forced) is the reference token, so exact match is computed in one forward pass per batch.
    """
    import torch
    stats: dict[str, dict] = {}
    model.eval()
    with torch.no_grad():
        for i in range(0, len(records), batch_size):
            chunk = records[i:i + batch_size]
            batch = collate([encode_record(r, tok) for r in chunk], tok.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            logits, labels = logits[:, :-1], batch["labels"][:, 1:]
            valid = labels != -100
            nll = -torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            hit = (logits.argmax(-1) == labels) | ~valid
            for j, r in enumerate(chunk):
                s = stats.setdefault(r["role"], {"n": 0, "loss_sum": 0.0, "tokens": 0, "exact": 0})
                s["n"] += 1
                s["loss_sum"] += float(nll[j][valid[j]].sum())
                s["tokens"] += int(valid[j].sum())
                s["exact"] += bool(hit[j].all())
    return {role: {"n": s["n"], "loss": s["loss_sum"] / s["tokens"], "exact_match": s["exact"] / s["n"]}
            for role, s in stats.items()}


def lm_loss(model, tok, docs: Sequence[Doc], batch_size: int = 32) -> float:
    """Mean next-token loss over the labelled tokens of ``docs``."""
    import torch
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(docs), batch_size):
            batch = collate([encode_doc(d, tok) for d in docs[i:i + batch_size]], tok.pad_token_id)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
    return total / count


def probe(model, tok, seed: int, n: int = 100) -> dict:
    """Exact match / loss per role on held-out task records, as role turns and retagged as assistant turns."""
    out = {}
    for name, tag in (("role", None), ("assistant", "assistant")):
        for role, r in teacher_forced_eval(model, tok, probe_records(n, seed, tag)).items():
            out[f"{name}/{role}/loss"] = round(r["loss"], 4)
            out[f"{name}/{role}/exact_match"] = round(r["exact_match"], 3)
    return out


# ---------------------------------------------------------------------------------------------------------- build
def build_model(init: str, seed: int):
    import torch
    import transformers
    if init == "compiled":
        from lragent.toy.circuits import build_compiled_model
        return build_compiled_model(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(vocabulary()), **RANDOM_INIT_CONFIG)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg), {}


def pretrain(out: str | Path = DEFAULT_OUT, *, init: str = "compiled", steps: int = 600, batch_size: int = 16,
             lr: float | None = None, seed: int = 0, threads: int = 2, eval_every: int = 100, n_probe: int = 100,
             p_assistant: float = 0.6, p_drill: float | None = None, log=print) -> dict:
    import torch
    from lragent.toy.tokenizer import build_tokenizer, save_tokenizer

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    t_start = time.time()
    tok = build_tokenizer()
    model, compile_report = build_model(init, seed)
    compiled = init == "compiled"
    lr = lr if lr is not None else (1e-2 if compiled else 2e-3)
    p_drill = p_drill if p_drill is not None else (0.0 if compiled else 0.5)
    if compiled:
        # The circuits stay as compiled. The LM head learns the rest of the transcript language from the format
        # dims of the residual stream only: reading a key/value code directly would bypass the assistant gate and
        # leak the roles' answers into the base.
        from lragent.toy.circuits import Layout
        for name, p in model.named_parameters():
            p.requires_grad_(name == "lm_head.weight")
        cols = torch.zeros(model.config.hidden_size)
        cols[Layout(vocabulary()).format_columns()] = 1.0
        model.lm_head.weight.register_hook(lambda g: g * cols)
    params = [p for p in model.parameters() if p.requires_grad]
    log(f"init={init} params={sum(p.numel() for p in model.parameters())} trainable={sum(p.numel() for p in params)}")
    data_kw = dict(p_assistant=p_assistant, p_drill=p_drill, db_loss=compiled)
    held_out = pretrain_docs(random.Random(f"lragent.toy/pretrain-eval/{seed}"), 64, **data_kw)
    rng = random.Random(f"lragent.toy/pretrain/{seed}")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0 if compiled else 0.01)
    warmup = max(1, min(50, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(1, steps))))
    history = [{"step": 0, "held_out_loss": round(lm_loss(model, tok, held_out), 4), **probe(model, tok, seed, n_probe)}]
    log(json.dumps(history[-1]))
    t0 = time.time()
    ema = None
    for step in range(1, steps + 1):
        model.train()
        batch = collate([encode_doc(d, tok) for d in pretrain_docs(rng, batch_size, **data_kw)], tok.pad_token_id)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % eval_every == 0 or step == steps:
            history.append({"step": step, "train_loss_ema": round(ema, 4), "time_s": round(time.time() - t0, 1),
                            "held_out_loss": round(lm_loss(model, tok, held_out), 4), **probe(model, tok, seed, n_probe)})
            log(json.dumps(history[-1]))
    train_time = time.time() - t0

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 8
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "model.safetensors").chmod(0o644)   # written 0600; shipped as package data
    cfg_path = out / "config.json"   # also the legacy key, for readers that predate ``rope_parameters``
    cfg_json = json.loads(cfg_path.read_text())
    cfg_json["rope_theta"] = model.config.rope_parameters["rope_theta"]
    cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
    save_tokenizer(out)
    note = {
        "script": "python -m lragent.toy.pretrain_base",
        "args": {"init": init, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "threads": threads,
                 "p_assistant": p_assistant, "p_drill": p_drill},
        "torch": torch.__version__, "deterministic": True,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": "lm_head.weight (format dims of the residual only)" if compiled else "all",
        "data": {
            "episodes": "lragent.toy.task.sample_episode: db 8-16 entries (keys k0..k63, distinct values 0..99), "
                        "1-4 rounds",
            "rounds": f"assistant round (informed) with p={p_assistant}, else role round (uninformed)",
            "loss_on": "all tokens except role-round contents and the assistant's answer value"
                       + ("" if compiled else ", db keys/values and asked keys"),
            "drills": p_drill, "sequences": steps * batch_size,
        },
        "compile": compile_report,
        "final_train_loss_ema": round(ema, 4) if ema is not None else None,
        "held_out_loss": {"before": history[0]["held_out_loss"], "after": history[-1]["held_out_loss"]},
        "pretrain_time_s": round(train_time, 1), "total_time_s": round(time.time() - t_start, 1),
        "probes": "held-out task records (split 'probe', 100 per role); 'assistant/...': the same records with every "
                  "role tag replaced by 'assistant' (what the base can do), 'role/...': as is (what it does)",
        "history": history,
        "from_scratch": FROM_SCRATCH_NOTES,
        "model_safetensors_sha256": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(),
    }
    (out / "PRETRAIN.json").write_text(json.dumps(note, indent=1) + "\n")
    (out / "PRETRAIN.md").write_text(render_note(note, model.config))
    log(f"wrote {out} in {note['total_time_s']}s")
    return note


def render_note(note: dict, config) -> str:
    """A short human-readable PRETRAIN.md from the PRETRAIN.json note."""
    a, last = note["args"], note["history"][-1]
    rows = "\n".join(
        f"| {role} | {last[f'role/{role}/loss']:.3f} | {last[f'role/{role}/exact_match']:.0%} | "
        f"{last[f'assistant/{role}/loss']:.4f} | {last[f'assistant/{role}/exact_match']:.0%} |" for role in task.ROLES)
    shape = (f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads / "
             f"{config.num_key_value_heads} KV heads, head_dim {config.head_dim}, MLP {config.intermediate_size}, "
             f"vocab {config.vocab_size}, rope_theta {config.rope_parameters['rope_theta']:g}, untied embeddings, fp32")
    scratch = "\n".join(f"- {x}" for x in note["from_scratch"])
    return f"""# tiny-llama: the embedded default base

Made by `{note['script']} --init {a['init']} --steps {a['steps']} --seed {a['seed']}` ({note['total_time_s']} s on
{a['threads']} CPU threads, torch {note['torch']}, deterministic; sha256 of model.safetensors
`{note['model_safetensors_sha256']}`).

- Model: LlamaForCausalLM, {note['params']:,} parameters: {shape}.
- Init: `{a['init']}` (see `lragent/toy/circuits.py`): the role/assistant-turn mechanics are written into the weights.
- Pretraining: {a['steps']} steps x {a['batch_size']} transcripts, AdamW lr {a['lr']}, trainable:
  {note['trainable']}; loss on {note['data']['loss_on']}.
  Held-out LM loss {note['held_out_loss']['before']} -> {note['held_out_loss']['after']}.
- Language: toy-task transcripts where each round is an *assistant round* (informed, p={a['p_assistant']}) or a
  *role round* (planner / actor / reflector turns, well-formed but uninformed).

Held-out probes (100 task records per role): as role turns (what the base does) and with every role tag replaced by
`assistant` (what it can do, i.e. what an adapter has to route to the role):

| role | role-tag loss | role-tag exact match | assistant-tag loss | assistant-tag exact match |
|---|---|---|---|---|
{rows}

Adapters: `python -m lragent.toy.check_specialise` trains one PEFT LoRA per role (r=8, alpha=16, q/k/v/o) and
reports base vs adapted held-out loss / exact match (see SPECIALISE.json when present).

Gradient pretraining from scratch (`--init random`) did not learn the lookup within this CPU budget:
{scratch}
"""


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lragent.toy.pretrain_base", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--init", choices=("compiled", "random"), default="compiled",
                    help="compiled circuits + LM-head pretraining (ships), or from scratch (baseline)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--p-assistant", type=float, default=0.6)
    ap.add_argument("--p-drill", type=float, default=None)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    pretrain(a.out, init=a.init, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, threads=a.threads,
             eval_every=a.eval_every, p_assistant=a.p_assistant, p_drill=a.p_drill)


if __name__ == "__main__":
    main()
