"""Make the ``handoff`` base: a small dense Llama trained from scratch by gradient descent to copy the latest code.

    python -m lragent.toy.pretrain_handoff [--out lragent/toy/assets/handoff-llama] [--steps 1000] [--seed 0]

The base's language is transcripts of the ``handoff`` task (``lragent.toy.handoff``) in which role turns answer the
*latest tool code itself* (``tool : result k40 k7 . </s> actor : answer 7 </s>``), whatever the role tag: the base is
role-agnostic, so on the task (where role R answers f_R(c) != c) it scores 0% by construction, and a role adapter
on k_proj / v_proj only has to change the value the answer position reads from the code token.

Each role turn (tag planner / actor / reflector / assistant, at random) is, independently, either a *target* turn
(``answer <code>``, with loss) or a *noise* turn (``answer <random other number>``, no loss on the number): so
earlier answers in a round are no reliable cue and the base learns to read the code from the latest tool output
(the key after the word ``key``, among other keys of the same set, so one attention layer cannot find it by
content; the latest: codes change between rounds).

Every weight is trained (random init, AdamW, all parameters): no compiled circuit, no dead block (the run measures
each block by ablation). Seeded and bit-reproducible on CPU with one thread (``torch.use_deterministic_algorithms``).
Writes ``config.json``, ``model.safetensors`` (fp32), ``generation_config.json``, the tokenizer files (the shared
word-level tokenizer of ``lragent.toy.tokenizer``), ``PRETRAIN.json`` and ``PRETRAIN.md`` into ``--out``.
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

from lragent.toy import handoff
from lragent.toy.pretrain_base import encode_doc
from lragent.toy.pretrain_base import lm_loss as base_lm_loss
from lragent.toy.tokenizer import vocabulary

DEFAULT_OUT = Path(__file__).parent / "assets" / "handoff-llama"
SCRIPT = "python -m lragent.toy.pretrain_handoff"

MODEL_CONFIG = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
TAGS = handoff.ROLES + ("assistant",)

Doc = list  # [(word, trained: bool)]


# ------------------------------------------------------------------------------------------------ pretraining data
def _turn(role: str, words: Sequence[str], trained: Sequence[bool] | None = None) -> Doc:
    trained = [True] * len(words) if trained is None else list(trained)
    return [(role, True), (":", True)] + list(zip(words, trained)) + [(handoff.EOS, True)]


def pretrain_doc(ep: handoff.Episode, rng: random.Random, p_target: float = 0.5) -> Doc:
    """One transcript of the base language: role turns answer the latest code (target, loss) or a random other
    number (noise, no loss on it); the tags are drawn at random, so nothing depends on the role."""
    doc: Doc = [(handoff.BOS, False)] + _turn("user", handoff.USER_TEXT.split())
    for rd in ep.rounds:
        doc += _turn("tool", handoff.tool_text(rd).split())
        for _ in rd.speakers:
            tag = rng.choice(TAGS)
            if rng.random() < p_target:
                doc += _turn(tag, handoff.answer_text(rd.code).split())
            else:
                n = rng.choice([c for c in range(handoff.N_CODES) if c != rd.code])
                doc += _turn(tag, handoff.answer_text(n).split(), [True, False])
    return doc


def pretrain_docs(rng: random.Random, n: int, p_target: float = 0.5) -> list[Doc]:
    return [pretrain_doc(handoff.sample_episode(rng), rng, p_target) for _ in range(n)]


def copy_records(n: int, seed: int, split: str = "probe") -> list[dict]:
    """Held-out task records with the completion replaced by the base's job: ``answer <latest code>``."""
    out = []
    for rec in handoff.make_records(n, seed, split):
        code = latest_code(rec["prompt"])
        out.append({**rec, "completion": handoff.completion_text(handoff.answer_text(code))})
    return out


latest_code = handoff.latest_code


# ---------------------------------------------------------------------------------------------------------- probes
def lm_loss(model, tok, docs: Sequence[Doc], batch_size: int = 64) -> float:
    """Mean next-token loss over the labelled tokens of ``docs`` (the toy base's measure, batches of 64)."""
    return base_lm_loss(model, tok, docs, batch_size)


def probe(model, tok, seed: int, n: int = 100) -> dict:
    """Held-out exact match per role: the copy job (``answer <latest code>``, what the base must do) and the task
    itself (``answer f_R(code)``, what it must not do)."""
    from lragent.toy.pretrain_base import teacher_forced_eval
    out = {}
    for name, recs in (("copy", copy_records(n, seed)), ("task", handoff.make_records(n, seed, "probe"))):
        res = teacher_forced_eval(model, tok, recs)
        for role, r in res.items():
            out[f"{name}/{role}/exact_match"] = round(r["exact_match"], 3)
            out[f"{name}/{role}/loss"] = round(r["loss"], 4)
        out[f"{name}/exact_match"] = round(sum(r["exact_match"] * r["n"] for r in res.values())
                                           / sum(r["n"] for r in res.values()), 3)
    return out


def _zero_output(module, args, out):
    import torch
    return (torch.zeros_like(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)


def ablations(model, tok, seed: int, docs: Sequence[Doc], n: int = 100) -> dict:
    """Each block's output zeroed in turn (``layers.<i>.self_attn``, ``layers.<i>.mlp``): copy exact match and
    held-out LM loss on ``docs`` (a live block matters: the loss rises without it)."""
    import torch
    from lragent.toy.pretrain_base import teacher_forced_eval
    recs = copy_records(n, seed)
    out = {}
    for i, layer in enumerate(model.model.layers):
        for name in ("self_attn", "mlp"):
            mod = getattr(layer, name)
            h = mod.register_forward_hook(_zero_output)
            try:
                res = teacher_forced_eval(model, tok, recs)
                loss = lm_loss(model, tok, docs)
            finally:
                h.remove()
            out[f"layers.{i}.{name}"] = {
                "copy_exact_match": round(sum(r["exact_match"] * r["n"] for r in res.values())
                                          / sum(r["n"] for r in res.values()), 3),
                "held_out_loss": round(loss, 4)}
    return out


def attention_on_code(model, tok, seed: int, n: int = 60) -> dict:
    """Mean attention weight (per layer, per query head) from the position that predicts the answer number (the
    ``answer`` token) to the latest code token, on held-out records."""
    import torch
    recs = handoff.make_records(n, seed, "probe")
    code_ids = set(tok.convert_tokens_to_ids([f"k{c}" for c in range(handoff.N_CODES)]))
    sums = None
    model.eval()
    with torch.no_grad():
        for rec in recs:
            ids = tok(rec["prompt"] + rec["completion"], add_special_tokens=False)["input_ids"]
            n_prompt = len(tok(rec["prompt"], add_special_tokens=False)["input_ids"])
            q = n_prompt  # the "answer" token: predicts the number
            code_pos = max(i for i, t in enumerate(ids[:n_prompt]) if t in code_ids)
            out = model(input_ids=torch.tensor([ids]), output_attentions=True)
            w = torch.stack([a[0, :, q, code_pos] for a in out.attentions])  # [layers, heads]
            sums = w if sums is None else sums + w
    return {f"layer{i}": [round(float(x), 3) for x in row] for i, row in enumerate(sums / len(recs))}


# ---------------------------------------------------------------------------------------------------------- train
def build_model(seed: int):
    import torch
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=len(vocabulary()), **MODEL_CONFIG)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def pretrain(out: str | Path = DEFAULT_OUT, *, steps: int = 1000, batch_size: int = 32, lr: float = 3e-3,
             seed: int = 0, threads: int = 1, eval_every: int = 200, n_probe: int = 100, p_target: float = 0.5,
             log=print) -> dict:
    import torch
    from lragent.toy.pretrain_base import collate
    from lragent.toy.tokenizer import build_tokenizer, save_tokenizer

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    t_start = time.time()
    tok = build_tokenizer()
    model = build_model(seed)
    params = list(model.parameters())
    log(f"params={sum(p.numel() for p in params)}")
    held_out = pretrain_docs(random.Random(f"lragent.toy.handoff/pretrain-eval/{seed}"), 128, p_target)
    rng = random.Random(f"lragent.toy.handoff/pretrain/{seed}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    warmup = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(1, steps))))
    history = [{"step": 0, "held_out_loss": round(lm_loss(model, tok, held_out), 4),
                **probe(model, tok, seed, n_probe)}]
    log(json.dumps(history[-1]))
    t0, ema = time.time(), None
    for step in range(1, steps + 1):
        model.train()
        batch = collate([encode_doc(d, tok) for d in pretrain_docs(rng, batch_size, p_target)], tok.pad_token_id)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % eval_every == 0 or step == steps:
            history.append({"step": step, "train_loss_ema": round(ema, 4), "time_s": round(time.time() - t0, 1),
                            "held_out_loss": round(lm_loss(model, tok, held_out), 4),
                            **probe(model, tok, seed, n_probe)})
            log(json.dumps(history[-1]))
    train_time = time.time() - t0
    live = ablations(model, tok, seed, held_out, n_probe)
    attn = attention_on_code(model, tok, seed)
    log(f"ablations (block output zeroed): {live}")
    log(f"attention from the answer position to the latest code: {attn}")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.config._attn_implementation = "sdpa"
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 4
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "model.safetensors").chmod(0o644)
    cfg_path = out / "config.json"   # also the legacy key, for readers that predate ``rope_parameters``
    cfg_json = json.loads(cfg_path.read_text())
    cfg_json["rope_theta"] = MODEL_CONFIG["rope_theta"]
    cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
    save_tokenizer(out)
    last = history[-1]
    note = {
        "script": SCRIPT,
        "args": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "threads": threads,
                 "p_target": p_target},
        "torch": torch.__version__, "deterministic": True,
        "config": MODEL_CONFIG, "params": sum(p.numel() for p in params), "trainable": "all (random init)",
        "data": {"episodes": "lragent.toy.handoff.sample_episode (1-4 rounds, 2-3 speakers per round, 0-3 fillers)",
                 "turns": f"target (answer = latest code, loss) with p={p_target}, else noise (random other number, "
                          "no loss on it); tags planner/actor/reflector/assistant at random",
                 "sequences": steps * batch_size},
        "final_train_loss_ema": round(ema, 4),
        "held_out_loss": {"before": history[0]["held_out_loss"], "after": last["held_out_loss"]},
        "copy_exact_match": last["copy/exact_match"], "task_exact_match": last["task/exact_match"],
        "ablations": live,
        "attention_answer_to_latest_code": attn,
        "pretrain_time_s": round(train_time, 1), "total_time_s": round(time.time() - t_start, 1),
        "probes": "held-out records (split 'probe', 100 per role): 'copy/...' = answer the latest code (the base's "
                  "job), 'task/...' = answer f_R(code) (the roles' job, for adapters)",
        "history": history,
        "model_safetensors_sha256": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(),
    }
    (out / "PRETRAIN.json").write_text(json.dumps(note, indent=1) + "\n")
    (out / "PRETRAIN.md").write_text(render_note(note))
    log(f"wrote {out} in {note['total_time_s']}s")
    return note


def render_note(note: dict) -> str:
    a, c, last = note["args"], note["config"], note["history"][-1]
    rows = "\n".join(f"| {r} | {last[f'copy/{r}/exact_match']:.0%} | {last[f'task/{r}/exact_match']:.0%} |"
                     for r in handoff.ROLES)
    abl = "\n".join(f"| {k} | {v['copy_exact_match']:.1%} | {v['held_out_loss']:.3f} |"
                    for k, v in note["ablations"].items())
    attn = "; ".join(f"{k}: {', '.join(f'{x:.2f}' for x in v)}"
                     for k, v in note["attention_answer_to_latest_code"].items())
    return f"""# handoff-llama: the base of the `handoff` task

Made by `{note['script']} --steps {a['steps']} --seed {a['seed']}`
({note['total_time_s']} s on {a['threads']} CPU thread, torch {note['torch']}, deterministic: a rerun writes the same
bytes; sha256 of model.safetensors `{note['model_safetensors_sha256']}`).

- Model: LlamaForCausalLM, {note['params']:,} parameters: {c['num_hidden_layers']} layers, hidden {c['hidden_size']},
  {c['num_attention_heads']} heads / {c['num_key_value_heads']} KV heads, head_dim {c['head_dim']}, \
MLP {c['intermediate_size']}, untied embeddings, fp32; the word-level tokenizer of `lragent.toy.tokenizer`.
- Trained from a random init, every parameter, by AdamW (lr {a['lr']}, cosine, {a['steps']} steps x {a['batch_size']}
  transcripts). Held-out LM loss {note['held_out_loss']['before']} -> {note['held_out_loss']['after']}.
- Language: `handoff` transcripts in which any role turn answers the latest tool code (`answer <c>` for `k<c>`):
  {note['data']['turns']}.

Held-out (100 records per role): the base's job (copy the latest code) and the task (the role's permutation):

| role | copy exact match | task exact match |
|---|---|---|
{rows}

Every block is trained (dense, random init) and live. With one block's output zeroed (intact: copy exact match
{note['copy_exact_match']:.1%}, held-out LM loss {note['held_out_loss']['after']:.3f}):

| block zeroed | copy exact match | held-out LM loss |
|---|---|---|
{abl}

Attention from the answer position (the `answer` token, which predicts the number) to the latest code token, mean
per query head: {attn}.
Layer 0 cannot tell the code from the other keys by content (its heads pick keys by identity); the last layer's
heads copy the code marked by the `key` before it.
"""


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog=SCRIPT, description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--p-target", type=float, default=0.5)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    pretrain(a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, threads=a.threads,
             eval_every=a.eval_every, p_target=a.p_target)


if __name__ == "__main__":
    main()
