"""Migration endpoints of a node agent: export blocks (weights [+ KV cache]) to a peer as ``mig``
frames over the data plane, import them on the receiving side (``node_agent.shards`` checks the
memory budget) and answer ``mig_ack`` / ``mig_nack``; the sender frees a block only once the
receiver has acknowledged it, and resolves the controller's ``migrate_out`` when all are answered.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future

from node_agent import protocol as P
from node_agent.budget import BudgetError

log = logging.getLogger("headroom.agent")


class Migration:
    """Mixin of ``node_agent.agent.Agent``. Uses the agent's ``store``, ``pending_mig`` (mig_id ->
    (item, future, group)), ``_mig_id`` and ``_send``; runs on the agent's worker thread."""

    def _migrate_out(self, dst: str, items: list[dict], done: Future, ship_weights: bool = True) -> None:
        group = {"left": len(items), "bytes": 0, "done": done}
        if not items:
            done.set_result(0)
            return
        for item in items:
            header, payload = self.store.export(item, weights=ship_weights)
            self._mig_id += 1
            self.pending_mig[self._mig_id] = (item, done, group)
            group["bytes"] += self._send(dst, {"type": "mig", "mig_id": self._mig_id, "item": item, "blk": header},
                                         payload)

    def _on_mig(self, src: str, h: dict, payload: bytes) -> None:
        try:
            block = self.store.import_(h["blk"], payload)
            self._send(src, {"type": "mig_ack", "mig_id": h["mig_id"], "block": block})
        except Exception as exc:
            log.warning("refused migration from %s: %s", src, exc)
            err = P.error_frame(h["mig_id"], exc)
            err.update(type="mig_nack", mig_id=h["mig_id"])
            self._send(src, err)

    def _on_mig_answer(self, h: dict) -> None:
        pending = self.pending_mig.pop(int(h["mig_id"]), None)
        if pending is None:  # an answer to nothing this agent sent (a stale or forged frame)
            log.warning("answer to unknown migration %s ignored", h["mig_id"])
            return
        item, done, group = pending
        if done.done():
            return
        if h["type"] == "mig_nack":
            done.set_exception(BudgetError(h.get("message", "refused"), h.get("details", {}))
                               if h.get("code") == BudgetError.code else RuntimeError(h.get("message")))
            return
        self.store.free(item)
        group["left"] -= 1
        if group["left"] == 0:
            done.set_result(group["bytes"])
