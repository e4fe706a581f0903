"""Continuous batching with on-demand blocks and preemption.

Each step: admit waiting requests while the pool has room for their tokens now (prefix reuse first); plan one
flat batch (decode tokens first, then prefill chunks, up to ``max_batch_tokens``), growing every planned
sequence's blocks; when a pool runs out, preempt the newest running sequence (its blocks are freed, what it
computed stays in the prefix tree, and it is requeued at the front to be recomputed); run the batch, sample, stop
and free finished sequences. A request that fits an empty pool always runs eventually: the oldest running
sequence is never preempted for a newer one, and a sequence running alone always fits.
"""
from __future__ import annotations

import time
from collections import deque

import torch

from .kvmanager import KVManager
from .runner import Batch, CacheTensors, ModelRunner, make_groups
from .sampling import is_greedy, sample
from .sequence import Sequence


class Scheduler:
    def __init__(self, runner: ModelRunner, kv: KVManager, cache: CacheTensors, eos_ids, *, lr_comp: int | None,
                 max_batch_tokens: int = 2048, max_num_seqs: int = 64):
        self.runner, self.kv, self.cache = runner, kv, cache
        self.eos_ids = set(eos_ids)
        self.lr_comp = lr_comp
        self.max_batch_tokens, self.max_num_seqs = max_batch_tokens, max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.steps = self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a request the engine checked (``KVManager.check_fits``) when it made it."""
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        """Stop a request now and free every block it holds (it publishes nothing more)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq, publish=False)
        seq.finish_reason = seq.finish_reason or "abort"
        seq.finish_time = time.perf_counter()

    def _release(self, seq: Sequence, *, publish: bool = True) -> None:
        """Free the blocks and the backend's per-request state of a sequence that stops running."""
        self.kv.finish(seq, publish=publish)
        self.runner.backend.release(seq.id)

    # -- admission and planning ---------------------------------------------------------------------------------
    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            # leave one block of headroom for the running sequences' growth, unless nothing else runs
            if not self.kv.try_admit(self.waiting[0], headroom=1 if self.running else 0):
                break                                   # FIFO: wait for blocks to be released
            self.running.append(self.waiting.popleft())

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq, publish=True)               # its computed blocks stay reusable until evicted
        seq.num_computed, seq.preemptions = 0, seq.preemptions + 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _plan(self) -> list[tuple[Sequence, int]]:
        budget, plan = self.max_batch_tokens, []
        decoding = [s for s in self.running if len(s) - s.num_computed == 1 and s.output_ids]
        prefilling = [s for s in self.running if not (len(s) - s.num_computed == 1 and s.output_ids)]
        for seq in decoding + prefilling:
            if seq not in self.running or budget <= 0:
                continue
            n = min(len(seq) - seq.num_computed, budget)
            while not self.kv.grow(seq, seq.num_computed + n):
                victim = max(self.running, key=lambda s: s.id)          # the newest request
                for i, (s, m) in enumerate(plan):
                    if s is victim:
                        del plan[i]
                        budget += m
                        break
                self._preempt(victim)
                if victim is seq:
                    break
            else:
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
            row0 = len(ids)
            ids += seq.token_slice(start, end)
            pos += range(start, end)
            roles += [seq.role_idx] * n
            offs, slots = self.kv.write_slots(seq, 0, start, end)
            kv_rows += [row0 + o for o in offs]
            kv_slots += slots
            tables.append(seq.comps[0].blocks)
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
        groups = make_groups(roles, dev)
        batch = Batch(input_ids=long(ids), positions=long(pos), groups=groups,
                      cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
                      seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev), block_table=table(tables),
                      agent_ids=torch.tensor([s.role_idx for s, _ in plan], dtype=torch.int32, device=dev),
                      kv_rows=long(kv_rows), kv_slots=long(kv_slots), logits_rows=long(logit_rows),
                      max_q=max(n for _, n in plan), max_k=max(lens), seq_ids=[s.id for s, _ in plan])
        if self.lr_comp is not None:
            batch.lr_block_table = table(lr_tables) if self.lr_comp != 0 else batch.block_table
            batch.lr_rows, batch.lr_slots = long(lr_rows), long(lr_slots)
            batch.lr_roles = role_t[batch.lr_rows] if lr_rows else role_t[:0]
        return batch

    # -- one step -----------------------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Run one engine step; return the sequences that sampled a token in it (finished ones included)."""
        self._admit()
        plan = self._plan()
        if not plan:
            self._admit()                                # preemption may have made room for a waiting request
            plan = self._plan()
        if not plan:
            if self.waiting and not self.running:        # cannot happen for a request that passed check_fits;
                seq = self.waiting.popleft()             # never spin on it: finish it with an error
                seq.finish_reason, seq.finish_time = "error", time.perf_counter()
                self._release(seq, publish=False)
                return [seq]
            return []
        logits = self.runner.forward(self._batch(plan), self.cache)
        self.steps += 1
        touched, li = [], 0
        now = time.perf_counter
        greedy = logits.argmax(dim=-1).tolist()          # one device sync for every greedy row
        for seq, n in plan:
            seq.num_computed += n
            if seq.num_computed < len(seq):
                continue                                  # a prefill chunk that is not the last one
            row = logits[li]
            li += 1
            try:
                tok = greedy[li - 1] if is_greedy(seq.params) else sample(row, seq.params, seq.generator)
                if seq.params.return_logits:
                    seq.logits.append(row.detach().to("cpu").clone())
                if seq.params.logprobs is not None:
                    lp = torch.log_softmax(row.float(), dim=-1)
                    k = min(seq.params.logprobs, lp.shape[-1])
                    top = torch.topk(lp, k) if k else None
                    seq.logprobs.append((float(lp[tok]), [] if top is None else
                                         list(zip(top.indices.tolist(), top.values.tolist()))))
            except (RuntimeError, ValueError, IndexError):     # one request's failure never stops the engine
                seq.finish_reason, seq.finish_time, seq.text = "error", now(), seq.detok.text
                self._release(seq, publish=False)
                self.running.remove(seq)
                touched.append(seq)
                continue
            seq.output_ids.append(tok)
            if seq.first_token_time is None:
                seq.first_token_time = now()
            if not seq.published_prefill:
                self.kv.publish(seq, partial=False)      # let later requests reuse this prompt right away
                seq.published_prefill = True
            touched.append(seq)
            if self._check_stop(seq, tok):
                seq.finish_time = now()
                self._release(seq)
                self.running.remove(seq)
        return touched

    def _check_stop(self, seq: Sequence, tok: int) -> bool:
        p, d = seq.params, seq.detok
        if tok in self.eos_ids and not p.ignore_eos:
            seq.finish_reason, seq.text = "eos", d.text
            return True
        cut = d.update(seq.output_ids)
        if cut >= 0:
            seq.finish_reason, seq.text = "stop", d.text[:cut]
            return True
        if len(seq.output_ids) >= p.max_new_tokens:
            seq.finish_reason, seq.text = "length", d.text
            return True
        return False
