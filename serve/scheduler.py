"""Continuous batching: admit requests as the cache allows, then each step runs one flat batch mixing decode tokens
and prefill chunks of sequences of any role; sample, stop, and free finished sequences."""
from __future__ import annotations

import time
from collections import deque

import torch

from .config import ServeError
from .kvmanager import KVManager
from .model import Batch, CacheTensors, ModelRunner
from .sampling import sample
from .sequence import Sequence


class Scheduler:
    def __init__(self, runner: ModelRunner, kv: KVManager, cache: CacheTensors, tokenizer, eos_ids, *,
                 kv_comp: int, lr_comp: int | None, max_batch_tokens: int = 512, max_num_seqs: int = 64):
        self.runner, self.kv, self.cache, self.tokenizer = runner, kv, cache, tokenizer
        self.eos_ids = set(eos_ids)
        self.kv_comp, self.lr_comp = kv_comp, lr_comp
        self.max_batch_tokens, self.max_num_seqs = max_batch_tokens, max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.steps = 0

    def add(self, seq: Sequence) -> None:
        self.kv.check_fits(seq)
        seq.arrival = time.perf_counter()
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            if not self.kv.try_admit(self.waiting[0]):
                if not self.running:                    # nothing will release blocks: never wait forever
                    seq = self.waiting.popleft()
                    raise ServeError(f"request {seq.id} ({seq.max_tokens} tokens) cannot be admitted into an idle "
                                     f"cache pool: give the engine more cache blocks")
                break                                   # FIFO: wait for blocks to be released
            self.running.append(self.waiting.popleft())

    def _plan(self) -> list[tuple[Sequence, int]]:
        budget, plan = self.max_batch_tokens, []
        decoding = [s for s in self.running if len(s) - s.num_computed == 1 and s.output_ids]
        prefilling = [s for s in self.running if not (len(s) - s.num_computed == 1 and s.output_ids)]
        for seq in decoding + prefilling:
            n = min(len(seq) - seq.num_computed, budget)
            if n <= 0:
                break
            plan.append((seq, n))
            budget -= n
        return plan

    def _batch(self, plan: list[tuple[Sequence, int]]) -> Batch:
        dev = self.runner.device
        ids, pos, roles, cu, lens, logit_rows = [], [], [], [0], [], []
        kv_rows, kv_slots, lr_rows, lr_slots = [], [], [], []
        tables, lr_tables = [], []
        for seq, n in plan:
            start, end = seq.num_computed, seq.num_computed + n
            self.kv.ensure_blocks(seq, end)
            row0 = len(ids)
            ids += seq.token_slice(start, end)
            pos += range(start, end)
            roles += [seq.role_idx] * n
            offs, slots = self.kv.write_slots(seq, self.kv_comp, start, end)
            kv_rows += [row0 + o for o in offs]
            kv_slots += slots
            tables.append(seq.comps[self.kv_comp].blocks)
            if self.lr_comp is not None:
                offs, slots = self.kv.write_slots(seq, self.lr_comp, start, end)
                lr_rows += [row0 + o for o in offs]
                lr_slots += slots
                lr_tables.append(seq.comps[self.lr_comp].blocks)
            cu.append(len(ids))
            lens.append(end)
            if end == len(seq):
                logit_rows.append(len(ids) - 1)

        def table(rows):
            width = max(len(r) for r in rows)
            return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32, device=dev)

        def long(x):
            return torch.tensor(x, dtype=torch.long, device=dev)

        role_t = long(roles)
        uniq = sorted(set(roles))
        groups = [(uniq[0], None)] if len(uniq) == 1 else \
            [(r, long([i for i, x in enumerate(roles) if x == r])) for r in uniq]
        batch = Batch(input_ids=long(ids), positions=long(pos), groups=groups,
                      cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
                      seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev), block_table=table(tables),
                      agent_ids=torch.tensor([s.role_idx for s, _ in plan], dtype=torch.int32, device=dev),
                      kv_rows=long(kv_rows), kv_slots=long(kv_slots), logits_rows=long(logit_rows),
                      max_q=max(n for _, n in plan), max_k=max(lens))
        if self.lr_comp is not None:
            batch.lr_block_table = table(lr_tables) if self.lr_comp != self.kv_comp else batch.block_table
            batch.lr_rows, batch.lr_slots = long(lr_rows), long(lr_slots)
            batch.lr_roles = role_t[batch.lr_rows] if lr_rows else role_t[:0]
        return batch

    def step(self) -> list[Sequence]:
        """Run one engine step; return the sequences that finished in it."""
        self._admit()
        plan = self._plan()
        if not plan:
            return []
        batch = self._batch(plan)
        logits = self.runner.forward(batch, self.cache)
        self.steps += 1
        finished, li = [], 0
        now = time.perf_counter
        greedy = logits.argmax(dim=-1).tolist()          # one device sync for every greedy row
        for seq, n in plan:
            seq.num_computed += n
            if seq.num_computed < len(seq):
                continue                                  # a prefill chunk that is not the last one
            row = logits[li]
            tok = greedy[li] if seq.params.temperature == 0 else sample(row, seq.params, seq.generator)
            li += 1
            if seq.params.return_logits:
                seq.logits.append(row.detach().to("cpu").clone())
            seq.output_ids.append(tok)
            if seq.first_token_time is None:
                seq.first_token_time = now()
            if not seq.published_prefill:
                self.kv.publish(seq, partial=False)      # let later requests reuse this prompt right away
                seq.published_prefill = True
            if self._check_stop(seq, tok):
                seq.finish_time = now()
                self.kv.finish(seq)
                self.running.remove(seq)
                finished.append(seq)
        return finished

    def _check_stop(self, seq: Sequence, tok: int) -> bool:
        p = seq.params
        if tok in self.eos_ids and not p.ignore_eos:
            seq.finish_reason = "eos"
            seq.text = self.tokenizer.decode(seq.output_ids[:-1], skip_special_tokens=True)
            return True
        if p.stop:
            text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            cuts = [text.find(s) for s in p.stop if s and s in text]
            if cuts:
                seq.finish_reason, seq.text = "stop", text[:min(cuts)]
                return True
        if len(seq.output_ids) >= p.max_new_tokens:
            seq.finish_reason = "length"
            seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            return True
        return False

    def abort_all(self) -> None:
        for seq in self.running:
            self.kv.finish(seq)
        self.running.clear()
        self.waiting.clear()
