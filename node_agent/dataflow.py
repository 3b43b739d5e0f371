"""The per-token dataflow of a node agent (``testbed.core.placement`` executed by the blocks one host holds).

A token starts at the source (embedding), flows layer by layer as activation messages
(``x`` -> attention groups -> ``ho`` -> projection -> ``h`` -> FFN shards -> ``part`` -> aggregator
-> ``x`` of the next layer, finally ``out`` back to the source for the LM head). Each host runs the
steps for the blocks it holds, in order, on the agent's single worker thread.

Every block's compute runs inside the agent's ``node_agent.pacing.ComputePacer``, which holds its
result until the emulated device would have finished it (no-op when the host is not paced).

Critical-path accounting: each activation carries ``cp = [compute, transfer, wait]`` of the path
that produced it; the receiver adds the transfer (release - sent_at, one host clock), and a block
that joins several inputs continues the path of the LAST one to arrive. The ``tally`` of
activation bytes per link travels with the data so that every send is counted exactly once and
the source ends up with the whole token's tally.
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from node_agent import protocol as P
from node_agent.model import assemble_head_outputs, ffn_combine
from testbed.partition.cost.blocks import call_work


@dataclass
class Inp:
    """An activation input at this agent: tensor, critical path, arrival time, byte tally."""

    t: torch.Tensor
    cp: list
    arrival: float
    tally: dict
    extra: dict = field(default_factory=dict)


@dataclass
class LayerState:
    x: Inp | None = None
    heads: list = field(default_factory=list)  # Inp with extra["groups"]
    h: Inp | None = None
    parts: list = field(default_factory=list)
    h_sent: bool = False


@dataclass
class TokenState:
    seq: int
    start_pos: int
    layers: dict = field(default_factory=dict)
    future: Future | None = None
    t0: float = 0.0

    def layer(self, l: int) -> LayerState:
        return self.layers.setdefault(l, LayerState())


def _join(inputs: list[Inp]) -> tuple[list, dict, float]:
    """Critical path of the last-arriving input, merged tallies, its arrival time."""
    gate = max(inputs, key=lambda i: i.arrival)
    tally: dict = {}
    for i in inputs:
        P.merge_tally(tally, i.tally)
    return list(gate.cp), tally, gate.arrival


class Dataflow:
    """Mixin of ``node_agent.agent.Agent``: the token steps. Uses the agent's ``name``, ``store``,
    ``placement``, ``pacer``, ``work_dims`` (the model's dimensions in the simulated weight format), ``pv``, ``tokens`` (seq -> TokenState), ``local`` (hand-offs to its own blocks, served
    by the worker before its inbox) and ``_send``."""

    def _emit(self, kind: str, dsts: list[str], layer: int, st: "TokenState", t: torch.Tensor, cp: list,
              tally: dict, t_ready: float, **extra) -> None:
        """Send one activation to each of ``dsts`` (distinct); the inherited tally rides on the first."""
        shape, raw, seq = None, None, st.seq
        extra["start_pos"] = st.start_pos
        for i, dst in enumerate(dsts):
            own = dict(tally) if i == 0 else {}
            if dst == self.name:
                inp = Inp(t, list(cp), time.time(), own, dict(extra))
                self.local.append(("local", {"kind": kind, "seq": seq, "layer": layer, "start_pos": st.start_pos}, inp))
                continue
            if raw is None:
                shape, raw = P.tensor_payload(t)
            key = f"{self.name}->{dst}"
            own[key] = own.get(key, 0) + len(raw)
            # microseconds are plenty for the path accounting, and every header byte is on the wire
            c = [round(cp[0], 6), round(cp[1], 6), round(cp[2] + (time.time() - t_ready), 6)]
            self._send(dst, P.act_header(kind, seq, layer, self.pv, shape, c, own, **extra), raw)

    def _paced(self, kind: str, calls: int = 1, **work):
        """The pacer's hold for one block call, its work counted as the cost models count it."""
        flops, nbytes = call_work(self.work_dims, kind, **work) if self.pacer.clock is not None else (0.0, 0.0)
        return self.pacer.paced(kind, flops, nbytes, calls)

    def _token(self, h: dict) -> TokenState:
        if h.get("pv", self.pv) != self.pv:
            raise P.ProtocolError(f"activation of placement version {h.get('pv')}, agent has {self.pv}")
        seq = int(h["seq"])
        st = self.tokens.get(seq)
        if st is None:
            st = self.tokens[seq] = TokenState(seq, int(h.get("start_pos", 0)))
            for old in [s for s in self.tokens if s < seq - 2]:
                self.tokens.pop(old, None)
        return st

    def _start_token(self, h: dict, fut: Future) -> None:
        st = TokenState(int(h["seq"]), int(h["start_pos"]), future=fut, t0=time.time())
        self.tokens[st.seq] = st
        ids = torch.tensor([h["ids"]], dtype=torch.long)
        t0 = time.time()
        with self._paced("embed", calls=0, n_tokens=ids.shape[1]):
            x = self.store.embedder(ids, st.start_pos)  # (1, T, D)
        t1 = time.time()
        lp = self.placement.layers[0]
        dsts = list(dict.fromkeys([lp.proj, *lp.heads]))
        self._emit("x", dsts, 0, st, x, [t1 - t0, 0.0, 0.0], {}, t1)

    def _on_act(self, h: dict, inp: Inp) -> None:
        st = self._token(h)
        if "start_pos" in h:
            st.start_pos = int(h["start_pos"])
        kind, l = h["kind"], int(h["layer"])
        if kind == "x":
            self._on_x(st, l, inp)
        elif kind == "ho":
            st.layer(l).heads.append(inp)
            self._try_proj(st, l)
        elif kind == "h":
            self._on_h(st, l, inp)
        elif kind == "part":
            st.layer(l).parts.append(inp)
            self._try_agg(st, l)
        elif kind == "out":
            self._finish(st, inp)

    def _on_x(self, st: TokenState, l: int, inp: Inp) -> None:
        lp = self.placement.layers[l]
        ls = st.layer(l)
        tally = inp.tally
        if lp.proj == self.name:
            ls.x, tally = inp, {}
        shard = self.store.attn.get(l)
        if shard is not None and shard.groups:
            t0 = time.time()
            n = inp.t.shape[1]
            with self._paced("attn", groups=len(shard.groups), context_len=st.start_pos + n, n_tokens=n):
                out = shard(inp.t, st.start_pos)  # (1, T, |groups|·q·d)
            t1 = time.time()
            cp = [inp.cp[0] + t1 - t0, inp.cp[1], inp.cp[2] + max(0.0, t0 - inp.arrival)]
            self._emit("ho", [lp.proj], l, st, out, cp, tally, t1, groups=list(shard.groups))
        self._try_proj(st, l)

    def _try_proj(self, st: TokenState, l: int) -> None:
        ls = st.layer(l)
        if ls.x is None or ls.h_sent:
            return
        n = sum(len(i.extra["groups"]) for i in ls.heads)
        if n < self.store.cfg.n_groups:
            return
        ls.h_sent = True
        cp, tally, arrival = _join([ls.x, *ls.heads])
        t0 = time.time()
        parts = [(i.extra["groups"], i.t) for i in ls.heads]
        with self._paced("proj", n_tokens=ls.x.t.shape[1]):
            h = self.store.proj[l](assemble_head_outputs(self.store.cfg, parts), ls.x.t)  # (1, T, D)
        t1 = time.time()
        cp = [cp[0] + t1 - t0, cp[1], cp[2] + max(0.0, t0 - arrival)]
        lp = self.placement.layers[l]
        self._emit("h", list(dict.fromkeys(s.device for s in lp.ffn)), l, st, h, cp, tally, t1)

    def _on_h(self, st: TokenState, l: int, inp: Inp) -> None:
        lp = self.placement.layers[l]
        agg = lp.ffn_aggregator
        t0 = time.time()
        partial = None
        shards = list(self.store.ffn.get(l, {}).values())
        cols = sum(s.col_end - s.col_start for s in shards)
        with self._paced("ffn", cols=cols, n_tokens=inp.t.shape[1]):
            for shard in shards:
                p = shard(inp.t)  # (1, T, D)
                partial = p if partial is None else partial + p
        t1 = time.time()
        cp = [inp.cp[0] + t1 - t0, inp.cp[1], inp.cp[2] + max(0.0, t0 - inp.arrival)]
        ls = st.layer(l)
        if agg == self.name:
            ls.h = Inp(inp.t, cp, t1, inp.tally)
            ls.parts.append(Inp(partial, cp, t1, {}))
            self._try_agg(st, l)
        else:
            self._emit("part", [agg], l, st, partial, cp, inp.tally, t1)

    def _try_agg(self, st: TokenState, l: int) -> None:
        ls = st.layer(l)
        lp = self.placement.layers[l]
        if ls.h is None or len(ls.parts) < len(set(s.device for s in lp.ffn)):
            return
        cp, tally, arrival = _join([ls.h, *ls.parts])
        t0 = time.time()
        with self._paced("combine", calls=0, parts=len(ls.parts), n_tokens=ls.h.t.shape[1]):
            x = ffn_combine([p.t for p in ls.parts], ls.h.t, self.store.ffn_bias[l])  # (1, T, D)
        t1 = time.time()
        cp = [cp[0] + t1 - t0, cp[1], cp[2] + max(0.0, t0 - arrival)]
        st.layers.pop(l, None)
        if l + 1 < len(self.placement.layers):
            nxt = self.placement.layers[l + 1]
            self._emit("x", list(dict.fromkeys([nxt.proj, *nxt.heads])), l + 1, st, x, cp, tally, t1)
        else:
            self._emit("out", [self.placement.source], l, st, x, cp, tally, t1)

    def _finish(self, st: TokenState, inp: Inp) -> None:
        t0 = time.time()
        with self._paced("head"):
            logits = self.store.lm_head(inp.t[:, -1:])  # (1, 1, V)
            token = int(logits[0, -1].argmax())
            top = torch.topk(logits[0, -1], 5)
        t1 = time.time()
        self.tokens.pop(st.seq, None)
        latency = t1 - st.t0
        compute = inp.cp[0] + (t1 - t0)
        transfer = inp.cp[1]
        if st.future is not None:
            st.future.set_result({"token_id": token, "latency_s": latency, "compute_s": compute,
                                  "transfer_s": transfer, "wait_s": max(0.0, latency - compute - transfer),
                                  "path_wait_s": inp.cp[2] + max(0.0, t0 - inp.arrival),
                                  "bytes_by_link": inp.tally, "bytes_moved": sum(inp.tally.values()),
                                  "top_ids": top.indices.tolist(), "top_logits": top.values.tolist()})
