"""Particles in embedding space: lift response tokens to embedding rows, decode moved rows back to tokens.

A particle is the [T, d] matrix of input-embedding rows of one response. Only real, non-special tokens move
(``movable_mask``); EOS and padding keep their place, so the decoded response keeps its length and ending.
"""

from __future__ import annotations

from typing import Literal

import torch


def movable_mask(ids: torch.Tensor, completion_mask: torch.Tensor, special_ids: set[int] | list[int]) -> torch.Tensor:
    """1 where a row may move: a generated token that is not a special token (EOS, pad, chat markers)."""
    special = torch.tensor(sorted(special_ids), dtype=ids.dtype, device=ids.device)
    return (completion_mask.bool() & ~torch.isin(ids, special)).to(torch.float32)


def full_shape(param: torch.Tensor) -> torch.Size:
    """A tensor's shape, or a DeepSpeed ZeRO-3 parameter's unsharded shape."""
    return getattr(param, "ds_shape", param.shape)


def lift(embedding_weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """ids [..., T] -> rows [..., T, d] (a copy, detached from the embedding table)."""
    return embedding_weight.detach()[ids].clone()


class NearestTokenDecoder:
    """Map rows to the nearest row of an embedding table, chunked over rows and vocabulary.

    Memory is bounded by ``row_chunk x vocab_chunk`` scores, so 150k-token vocabularies decode in pieces.
    ``exclude_ids`` (special tokens) are never chosen. ``metric`` is "l2" or "cosine".
    """

    def __init__(self, embedding_weight: torch.Tensor, *, exclude_ids=(), metric: Literal["l2", "cosine"] = "l2",
                 vocab_chunk: int = 16384, row_chunk: int = 1024):
        if metric not in ("l2", "cosine"):
            raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
        self._source = embedding_weight
        self.metric, self.vocab_chunk, self.row_chunk = metric, vocab_chunk, row_chunk
        vocab = full_shape(embedding_weight)[0]
        self.allowed = torch.ones(vocab, dtype=torch.bool, device=embedding_weight.device)
        excluded = [i for i in exclude_ids if 0 <= i < vocab]
        self.allowed[excluded] = False
        if not self.allowed.any():
            raise ValueError("every token is excluded: nothing to decode to")
        self._table = self._sq = None

    @property
    def weight(self) -> torch.Tensor:
        """The table as it is now: read at call time, because DeepSpeed ZeRO-3 only holds it whole inside a
        parameter gather (the trainer gathers for the step's transport)."""
        w = self._source.detach()
        if w.shape[0] != self.allowed.shape[0]:
            raise RuntimeError("the embedding table is sharded (DeepSpeed ZeRO-3): decode inside a parameter gather, "
                               "e.g. VGFTrainer.gathered_model()")
        return w

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Search table and squared norms, built on first use and kept (the base model is frozen)."""
        if self._table is None:
            w = self.weight.float()
            if hasattr(self._source, "ds_id"):  # a ZeRO-3 parameter: its storage is freed after the gather
                w = w.clone()
            self._table = torch.nn.functional.normalize(w, dim=-1) if self.metric == "cosine" else w
            self._sq = (w * w).sum(-1)
        return self._table, self._sq

    @torch.no_grad()
    def nearest(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [..., d] -> token ids [...]."""
        flat = rows.reshape(-1, rows.shape[-1]).float().to(self._source.device)
        if self.metric == "cosine":
            flat = torch.nn.functional.normalize(flat, dim=-1)
        out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        table_all, sq = self.tables()
        for r in range(0, flat.shape[0], self.row_chunk):
            block = flat[r:r + self.row_chunk]
            best = torch.full((block.shape[0],), -float("inf"), device=flat.device)
            best_id = torch.zeros(block.shape[0], dtype=torch.long, device=flat.device)
            for v in range(0, table_all.shape[0], self.vocab_chunk):
                table = table_all[v:v + self.vocab_chunk]
                # maximise 2 r.e - |e|^2 (= -|r - e|^2 + |r|^2) for l2, r.e for cosine
                score = block @ table.T
                if self.metric == "l2":
                    score = 2 * score - sq[v:v + self.vocab_chunk]
                score = score.masked_fill(~self.allowed[v:v + self.vocab_chunk], -float("inf"))
                value, idx = score.max(-1)
                better = value > best
                best = torch.where(better, value, best)
                best_id = torch.where(better, idx + v, best_id)
            out[r:r + self.row_chunk] = best_id
        return out.reshape(rows.shape[:-1]).to(rows.device)

    def decode(self, moved: torch.Tensor, start: torch.Tensor, ids: torch.Tensor,
               movable: torch.Tensor) -> torch.Tensor:
        """New ids for the moved rows; rows that are not movable or did not move keep their token exactly."""
        changed = movable.bool() & (moved != start).any(-1)
        if not changed.any():
            return ids.clone()
        new = ids.clone()
        new[changed] = self.nearest(moved[changed])
        return new
